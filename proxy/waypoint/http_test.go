package waypoint_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// httpBed: three pods (127.0.0.2-4) each with an HTTP app (HTTP/1.1 and HTTP/2 prior knowledge)
// behind an HBONE terminator, a fourth endpoint (127.0.0.5) dead, and detour's waypoint for
// service web (10.96.0.20:80).
type httpBed struct {
	waypoint string
	client   *hbone.Dialer
	opts     hbone.DialOptions
	reg      *prometheus.Registry
	m        *metrics.Metrics
	conns    sync.Map // app-side connections seen, by remote address
	balancer *route.Balancer
	appPort  int
	id       func(spiffeID string) identity.Source // the bed's CA issuing
}

func newHTTPBed(t *testing.T, port route.Port, tweak func(*waypoint.Handler), policies ...*authz.Policy) *httpBed {
	_, id := testCA(t)
	b := &httpBed{reg: prometheus.NewRegistry(), id: id}
	b.m = metrics.New(b.reg)
	hbonePort, appPort := freePort(t), freePort(t)
	for i := 2; i <= 4; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		app, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(appPort)))
		if err != nil {
			t.Skipf("port %d not free on %s: %v", appPort, ip, err)
		}
		var p http.Protocols
		p.SetHTTP1(true)
		p.SetUnencryptedHTTP2(true)
		as := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b.conns.Store(r.RemoteAddr, true)
			if forwardApp(w, r) {
				return
			}
			if r.URL.Path == "/duplex" { // answers first, then echoes the body as it arrives
				rc := http.NewResponseController(w)
				rc.EnableFullDuplex()
				rc.SetReadDeadline(time.Now().Add(10 * time.Second)) // bounded, whatever the waypoint does
				io.WriteString(w, "ready\n")
				rc.Flush()
				buf := make([]byte, 1024)
				for {
					n, err := r.Body.Read(buf)
					w.Write(buf[:n])
					rc.Flush()
					if err != nil {
						return
					}
				}
			}
			body, _ := io.ReadAll(r.Body)
			w.Header().Set("X-Pod", ip)
			w.Header()["Echo-X-User"] = r.Header["X-User"] // what an ext_authz provider set upstream
			fmt.Fprintf(w, "%s %s %s host=%s fwd=%s body=%s", ip, r.Proto, r.URL.RequestURI(), r.Host, r.Header.Get("X-Forwarded-For"), body)
		})}
		go as.Serve(app)
		t.Cleanup(func() { as.Close() })
		hl, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(hbonePort)))
		if err != nil {
			t.Skipf("port %d not free on %s: %v", hbonePort, ip, err)
		}
		hs := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(id("spiffe://cluster.local/ns/demo/sa/web"), nil), Logger: quiet}
		go hs.Serve(hl)
		t.Cleanup(func() { hs.Close() })
	}
	var eps []route.Endpoint
	for i := 2; i <= 5; i++ {
		eps = append(eps, route.Endpoint{IP: netip.MustParseAddr(fmt.Sprintf("127.0.0.%d", i)), Ready: true, ServiceAccount: "web",
			Workload: &route.Workload{Name: "web-v1", Namespace: "demo", ServiceAccount: "web", App: "web", Version: "v1",
				CanonicalService: "web", CanonicalRevision: "v1"}})
	}
	// The client's pod: the HBONE client connects from 127.0.0.1, as ztunnel from the client pod's address.
	sleep := &route.Workload{IPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, Name: "sleep", Namespace: "default",
		ServiceAccount: "sleep", App: "sleep", CanonicalService: "sleep", CanonicalRevision: "latest"}
	port.TargetPort = uint16(appPort)
	b.appPort = appPort
	table, err := route.NewTable([]*route.Service{{Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.20")}, Ports: []route.Port{port}, Endpoints: eps}}, sleep)
	if err != nil {
		t.Fatal(err)
	}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, policies)
	wpID := id("spiffe://cluster.local/ns/demo/sa/waypoint")
	onward := &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { onward.Close() })
	b.balancer = &route.Balancer{} // round robin: the spread is checked
	h := &waypoint.Handler{Routes: func() *route.Table { return table }, Balancer: b.balancer, Identity: wpID,
		Dialer: onward, HBONEPort: uint16(hbonePort), Logger: quiet, Metrics: b.m, Inspect: waypoint.InspectAlways,
		SniffWait: clientFirstWait, Policies: func() *authz.Engine { return engine }}
	if tweak != nil {
		tweak(h)
	}
	b.waypoint = serveWaypoint(t, h, wpID)
	cliTLS, _ := identity.ClientTLS(id("spiffe://cluster.local/ns/default/sa/sleep"), spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/waypoint"))
	b.opts = hbone.DialOptions{TLSConfig: cliTLS, Forwarded: `for="10.1.1.1:1234"`}
	b.client = &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { b.client.Close() })
	return b
}

// clientFirstWait is the SniffWait of the beds whose clients always speak first and then
// half-close: their sniff is decided by the bytes or by their end, never by the wait, so it is a
// hang guard. A short wait is a timing: a loaded machine may pause a client past it (50 ms once
// sent a TLSRoute port's ClientHello to the TCPRoute, unsniffed: "first record does not look
// like a TLS handshake"). Tests of the wait itself (a server speaking first) set their own.
const clientFirstWait = 10 * time.Second

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// httpClient sends requests over HBONE streams to the waypoint, as ztunnel would carry them:
// one stream per client connection; h2 selects HTTP/2 prior knowledge.
func (b *httpBed) httpClient(t *testing.T, h2 bool) (*http.Client, *int) {
	streams := new(int)
	var p http.Protocols
	if h2 {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: &p, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		*streams++
		return b.client.Dial(ctx, b.waypoint, addr, b.opts)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}, streams
}

func get(t *testing.T, c *http.Client, url string, hdr ...string) (int, string, http.Header) {
	t.Helper()
	return send(t, c, "POST", url, strings.NewReader(pingBody), hdr...)
}

// send sends one request with body and the header pairs hdr (name, value, ...), and returns its
// answer, read whole.
func send(t *testing.T, c *http.Client, method, url string, body io.Reader, hdr ...string) (int, string, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(got), resp.Header
}

// One client connection (one HBONE stream), many requests: each request is balanced on its own
// over the three live endpoints (the dead one costs no failed request), and reaches the app
// byte-exact with its protocol, path, host and forwarding headers.
func TestHTTPPerRequestBalancing(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprint("h2=", h2), func(t *testing.T) {
			b := newHTTPBed(t, route.Port{Name: "web", Port: 80}, nil)
			c, streams := b.httpClient(t, h2)
			pods := map[string]int{}
			for i := range 30 {
				code, body, hdr := get(t, c, fmt.Sprintf("http://10.96.0.20:80/item/%d?q=1", i), "X-Forwarded-For", "1.2.3.4")
				proto := "HTTP/1.1"
				if h2 {
					proto = "HTTP/2.0"
				}
				want := fmt.Sprintf("%s %s /item/%d?q=1 host=10.96.0.20:80 fwd=1.2.3.4 body=%s", hdr.Get("X-Pod"), proto, i, pingBody)
				if code != 200 || body != want {
					t.Fatalf("request %d: %d %q, want 200 %q", i, code, body, want)
				}
				pods[hdr.Get("X-Pod")]++
			}
			if len(pods) != 3 || *streams != 1 {
				t.Fatalf("30 requests on %d client streams reached %v; want 1 stream spread over 3 pods", *streams, pods)
			}
			for pod, n := range pods {
				if n < 8 {
					t.Errorf("%s got %d of 30 requests: %v", pod, n, pods)
				}
			}
			if got := sum(t, b.reg, "istio_requests_total"); got != 30 {
				t.Errorf("istio_requests_total = %v, want 30", got)
			}
			for i := 2; i <= 5; i++ {
				ep := netip.MustParseAddrPort(fmt.Sprintf("127.0.0.%d:%d", i, b.appPort))
				if n := b.balancer.InFlight(ep); n != 0 {
					t.Errorf("%v: %d requests still counted in flight", ep, n)
				}
			}
		})
	}
}

// A policy on HTTP attributes is enforced per request on a shared connection: a denied request
// gets Envoy's 403 "RBAC: access denied" and the next request on the same connection still works;
// paths are normalized before the policy sees them (and that is the path the app gets).
func TestHTTPPolicyPerRequest(t *testing.T) {
	deny := &authz.Policy{Namespace: "demo", Name: "no-admin", Spec: &secv1beta1.AuthorizationPolicy{
		Action:     secv1beta1.AuthorizationPolicy_DENY,
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
		Rules:      []*secv1beta1.Rule{{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Paths: []string{"/admin*"}}}}}},
	}}
	allowGet := &authz.Policy{Namespace: "demo", Name: "reads", Spec: &secv1beta1.AuthorizationPolicy{
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
		Rules: []*secv1beta1.Rule{{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"POST"}}}}},
			{When: []*secv1beta1.Condition{{Key: "request.headers[x-dev]", Values: []string{"alice"}}}}},
	}}
	b := newHTTPBed(t, route.Port{Name: "web", Port: 80}, nil, deny, allowGet)
	c, streams := b.httpClient(t, false)
	for _, tc := range []struct {
		path   string
		hdr    []string
		code   int
		prefix string
	}{
		{"/ok", nil, 200, ""},
		{"/admin/x", nil, 403, "RBAC: access denied"},
		{"/a/../admin", nil, 403, "RBAC: access denied"},
		{"/%61dmin", nil, 403, "RBAC: access denied"},
		{"/public/./page", nil, 200, ""},
		{"/ok", []string{"X-Dev", "alice"}, 200, ""},
	} {
		code, body, _ := get(t, c, "http://10.96.0.20:80"+tc.path, tc.hdr...)
		if code != tc.code || tc.prefix != "" && body != tc.prefix {
			t.Errorf("%s: %d %q, want %d %q", tc.path, code, body, tc.code, tc.prefix)
		}
		if code == 200 && strings.Contains(body, "/./") {
			t.Errorf("%s: the app got an unnormalized path: %q", tc.path, body)
		}
	}
	req, _ := http.NewRequest("GET", "http://10.96.0.20:80/ok", nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 {
		t.Errorf("GET without x-dev (no ALLOW matches): %d, want 403", resp.StatusCode)
	}
	if *streams != 1 {
		t.Errorf("denials broke the client connection: %d streams", *streams)
	}
	if got := sum(t, b.reg, "istio_requests_total"); got != 7 {
		t.Errorf("istio_requests_total = %v, want 7", got)
	}
}

// Opaque TCP on an inspected port still flows (the sniffer hands back every byte).
func TestSniffedTCPPassesThrough(t *testing.T) {
	b := newHTTPBed(t, route.Port{Name: "web", Port: 80}, nil)
	s, err := b.client.Dial(context.Background(), b.waypoint, "10.96.0.20:80", b.opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Not HTTP: the app's HTTP server answers 400 to bytes it cannot parse, which proves they
	// arrived as sent.
	io.WriteString(s, "\x00\x01binary\r\n\r\n")
	s.CloseWrite()
	got, _ := io.ReadAll(s)
	if !strings.HasPrefix(string(got), "HTTP/1.1 400") {
		t.Fatalf("got %q", got)
	}
}

var pingBody = strings.Repeat("p", 3000)

// The access log has one JSON record per request, with what an operator greps for.
func TestAccessLog(t *testing.T) {
	var mu sync.Mutex
	var buf bytes.Buffer
	b := newHTTPBed(t, route.Port{Name: "http-web", Port: 80}, func(h *waypoint.Handler) {
		h.AccessLog = slog.New(slog.NewJSONHandler(lockedWriter{&mu, &buf}, nil))
	})
	c, _ := b.httpClient(t, false)
	if code, _, _ := get(t, c, "http://10.96.0.20:80/a/../b?x=1"); code != 200 {
		t.Fatalf("status %d", code)
	}
	mu.Lock()
	defer mu.Unlock()
	var rec map[string]any
	if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
		t.Fatalf("%v: %q", err, buf.String())
	}
	for k, want := range map[string]any{"msg": "request", "method": "POST", "path": "/b", "status": 200.0, "protocol": "HTTP/1.1",
		"source": "cluster.local/ns/default/sa/sleep", "service": "web.demo.svc.cluster.local", "authority": "10.96.0.20:80", "flags": "-"} {
		if rec[k] != want {
			t.Errorf("%s = %v, want %v (record %v)", k, rec[k], want, rec)
		}
	}
	if up, _ := rec["upstream"].(string); !strings.HasPrefix(up, "127.0.0.") {
		t.Errorf("upstream = %q", up)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// HTTP/1 through the waypoint is full duplex, as through Envoy: an app that answers before the
// request body has arrived still gets all of it, and the client all of the answer. The client
// sends its body only after the answer has begun, so without full duplex at the waypoint the
// body is cut at the first flushed response byte (and the upstream connection with it).
func TestHTTP1FullDuplex(t *testing.T) {
	b := newHTTPBed(t, route.Port{Name: "http", Port: 80, AppProtocol: "http"}, nil)
	c, _ := b.httpClient(t, false)
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.CloseWithError(errors.New("test over")) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "POST", "http://10.96.0.20:80/duplex", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = -1
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("the answer began with %q, %v", line, err)
	}
	want := strings.Repeat("after the answer began; ", 200)
	go func() {
		for i := 0; i < len(want); i += 600 {
			io.WriteString(pw, want[i:min(i+600, len(want))])
		}
		pw.Close()
	}()
	got, err := io.ReadAll(br)
	if err != nil || string(got) != want {
		t.Fatalf("echoed %d of %d bytes: %v", len(got), len(want), err)
	}
}
