package interop

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// App ports on every pod of service web (VIP 10.96.0.30); the service ports are these minus
// 8000 and none declares a protocol, so the waypoint sniffs each stream.
const (
	appHTTP = 8080 // HTTP/1.1 and HTTP/2 prior knowledge
	appGRPC = 8081
	appTCP  = 8082 // echo
	appTLS  = 8443 // TLS echo for web.example.com
)

// pods records which pod served what.
type pods struct {
	mu   sync.Mutex
	hits map[string]int
}

func (p *pods) hit(ip string) {
	p.mu.Lock()
	p.hits[ip]++
	p.mu.Unlock()
}

func (p *pods) spread() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]int{}
	for k, v := range p.hits {
		out[k] = v
	}
	return out
}

type grpcEcho struct {
	testgrpc.UnimplementedTestServiceServer
	ip   string
	pods *pods
}

// FullDuplexCall answers each message with its payload, prefixed by the pod's IP.
func (g *grpcEcho) FullDuplexCall(s testgrpc.TestService_FullDuplexCallServer) error {
	g.pods.hit(g.ip)
	for {
		req, err := s.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		body := append([]byte(g.ip+" "), req.GetPayload().GetBody()...)
		if err := s.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: body}}); err != nil {
			return err
		}
	}
}

// startPod runs the four apps on ip and Istio's Go HBONE server (the pod's ztunnel) on hbonePort.
func startPod(t *testing.T, ip string, hbonePort int, tlsCert tls.Certificate, id identity.Source, seen *pods) {
	listen := func(port int) net.Listener {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			t.Skipf("port %d not free on %s: %v", port, ip, err)
		}
		return l
	}
	it.IstioServerOn(t, listen(hbonePort), identity.ServerTLS(id, nil))

	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	hs := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.hit(ip)
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Pod", ip)
		w.Write(body)
	})}
	hl := listen(appHTTP)
	go hs.Serve(hl)
	t.Cleanup(func() { hs.Close() })

	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, &grpcEcho{ip: ip, pods: seen})
	gl := listen(appGRPC)
	go gs.Serve(gl)
	t.Cleanup(gs.Stop)

	echo := func(l net.Listener) {
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					if tc, ok := c.(*tls.Conn); ok {
						if tc.Handshake() != nil {
							return
						}
					}
					seen.hit(ip)
					io.Copy(c, c)
				}()
			}
		}()
	}
	echo(listen(appTCP))
	echo(tls.NewListener(listen(appTLS), &tls.Config{Certificates: []tls.Certificate{tlsCert}}))
}

// selfSigned makes the TLS app's certificate (passthrough: the waypoint never sees inside).
func selfSigned(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// Istio's Go HBONE client as the source, detour as the waypoint inspecting every stream, and
// Istio's Go HBONE server as each pod's ztunnel. HTTP/1.1 keep-alive, HTTP/2, gRPC bidi streaming,
// opaque TCP and TLS passthrough all arrive byte-exact, spread over three pods, with a dead
// fourth endpoint failing nothing. A policy admits TLS only for SNI web.example.com. The
// waypoint's metrics match the traffic.
func TestIstioProtocolsThroughDetourWaypoint(t *testing.T) {
	it.QuietIstio()
	p := it.NewPKI(t)
	quiet := slog.New(slog.DiscardHandler)
	issue := func(id string) identity.Source { return p.Source(t, id) }
	hbonePort := it.FreePort(t, "127.0.0.2")
	cert, pool := selfSigned(t, "web.example.com")
	seen := &pods{hits: map[string]int{}}
	podID := issue("spiffe://cluster.local/ns/demo/sa/web")
	var eps []route.Endpoint
	for i := 2; i <= 5; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		eps = append(eps, route.Endpoint{IP: netip.MustParseAddr(ip), Ready: true, ServiceAccount: "web"})
		if i < 5 { // 127.0.0.5 is dead: nothing listens
			startPod(t, ip, hbonePort, cert, podID, seen)
		}
	}
	var ports []route.Port
	for _, app := range []int{appHTTP, appGRPC, appTCP, appTLS} {
		ports = append(ports, route.Port{Port: uint16(app - 8000), TargetPort: uint16(app)})
	}
	table, err := route.NewTable([]*route.Service{{Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.30")}, Ports: ports, Endpoints: eps}})
	if err != nil {
		t.Fatal(err)
	}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{{Namespace: "demo", Name: "web",
		Spec: &secv1beta1.AuthorizationPolicy{
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
			Rules: []*secv1beta1.Rule{
				{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Ports: []string{"80", "81", "82"}}}}},
				{When: []*secv1beta1.Condition{{Key: "connection.sni", Values: []string{"web.example.com"}}}},
			},
		}}})
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	onward := &hbone.Dialer{Logger: quiet}
	defer onward.Close()
	wp := it.DetourServer(t, p, &waypoint.Handler{Routes: func() *route.Table { return table }, Balancer: &route.Balancer{},
		Identity: issue(it.ServerID), Dialer: onward, HBONEPort: uint16(hbonePort), Logger: quiet,
		Policies: func() *authz.Engine { return engine }, Inspect: waypoint.InspectAlways, Metrics: m})
	d := it.IstioDialer(p, wp.Addr().String())

	t.Run("http1-keepalive", func(t *testing.T) { checkHTTP(t, d, false) })
	t.Run("http2", func(t *testing.T) { checkHTTP(t, d, true) })
	t.Run("grpc-bidi-streaming", func(t *testing.T) { checkGRPC(t, d) })
	t.Run("tcp", func(t *testing.T) {
		for i := range 12 {
			c, err := d.DialContext(ctxT(t), "tcp", "10.96.0.30:82")
			if err != nil {
				t.Fatal(err)
			}
			echoCheck(t, c, 64<<10+i, nil)
			c.Close()
		}
	})
	t.Run("tls-passthrough-sni", func(t *testing.T) {
		for i := range 6 {
			raw, err := d.DialContext(ctxT(t), "tcp", "10.96.0.30:443")
			if err != nil {
				t.Fatal(err)
			}
			c := tls.Client(raw, &tls.Config{ServerName: "web.example.com", RootCAs: pool})
			echoCheck(t, c, 32<<10+i, c.CloseWrite)
			c.Close()
		}
		// Another SNI: the policy does not admit it, the stream is reset before any byte reaches a pod.
		raw, err := d.DialContext(ctxT(t), "tcp", "10.96.0.30:443")
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		c := tls.Client(raw, &tls.Config{ServerName: "other.example.com", InsecureSkipVerify: true})
		if err := c.HandshakeContext(ctxT(t)); err == nil {
			t.Fatal("TLS with a refused SNI got through")
		}
	})

	for ip, n := range seen.spread() {
		if n < 8 {
			t.Errorf("%s served %d of the requests and streams: %v", ip, n, seen.spread())
		}
	}
	if s := seen.spread(); len(s) != 3 {
		t.Errorf("pods that served: %v", s)
	}
	// Metrics: every HTTP request and gRPC call counted with its protocol; opaque streams counted
	// when they end (just after the client saw the end).
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(m.Active) != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	lv := map[string]string{"reporter": "waypoint", "source_principal": "spiffe://cluster.local/ns/default/sa/client",
		"destination_service": "web.demo.svc.cluster.local", "destination_service_namespace": "demo", "connection_security_policy": "mutual_tls"}
	with := func(kv ...string) map[string]string {
		m := maps.Clone(lv)
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	for _, c := range []struct {
		name string
		got  float64
		want float64
	}{
		{"http requests 200", metrics.Sum(m.Requests, with("request_protocol", "http", "response_code", "200", "grpc_response_status", "", "response_flags", "-")), 2 * httpRequests},
		{"grpc calls OK", metrics.Sum(m.Requests, with("request_protocol", "grpc", "response_code", "200", "grpc_response_status", "0", "response_flags", "-")), grpcCalls},
		{"opaque streams closed (12 tcp, 6 tls; the refused SNI never opened)", metrics.Sum(m.Closed, lv), 18},
		{"denials", testutil.ToFloat64(m.Decisions.WithLabelValues("deny", "")), 1},
	} {
		if c.got != c.want {
			t.Errorf("%s: %v, want %v", c.name, c.got, c.want)
		}
	}
}

const (
	httpRequests = 30
	grpcCalls    = 6
)

// checkHTTP sends httpRequests requests over one Istio HBONE stream (keep-alive or HTTP/2).
func checkHTTP(t *testing.T, d istiohbone.Dialer, h2 bool) {
	streams := 0
	var p http.Protocols
	if h2 {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: &p, MaxConnsPerHost: 1, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		streams++
		return d.DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	pods := map[string]int{}
	for i := range httpRequests {
		body := bytes.Repeat([]byte{byte(i)}, 1000*i)
		resp, err := c.Post("http://10.96.0.30:80/upload", "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || !bytes.Equal(got, body) {
			t.Fatalf("request %d: %d, %d bytes back of %d, %v", i, resp.StatusCode, len(got), len(body), err)
		}
		if h2 != (resp.ProtoMajor == 2) {
			t.Fatalf("request %d answered over %s", i, resp.Proto)
		}
		pods[resp.Header.Get("X-Pod")]++
	}
	if streams != 1 || len(pods) != 3 {
		t.Errorf("%d requests on %d HBONE streams reached pods %v; want one stream, three pods", httpRequests, streams, pods)
	}
}

// checkGRPC runs grpcCalls bidi-streaming calls on one gRPC connection (one HBONE stream), 20
// messages each, every reply checked as it comes.
func checkGRPC(t *testing.T, d istiohbone.Dialer) {
	cc, err := grpc.NewClient("passthrough:///10.96.0.30:81", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)
	for call := range grpcCalls {
		s, err := client.FullDuplexCall(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		var pod string
		for i := range 20 {
			msg := bytes.Repeat([]byte{byte(i)}, 100*i+1)
			if err := s.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: msg}}); err != nil {
				t.Fatal(err)
			}
			resp, err := s.Recv()
			if err != nil {
				t.Fatalf("call %d message %d: %v", call, i, err)
			}
			ip, got, _ := bytes.Cut(resp.GetPayload().GetBody(), []byte(" "))
			if !bytes.Equal(got, msg) || pod != "" && string(ip) != pod {
				t.Fatalf("call %d message %d: reply from %s differs (call began on %s)", call, i, ip, pod)
			}
			pod = string(ip)
		}
		s.CloseSend()
		if _, err := s.Recv(); err != io.EOF {
			t.Fatalf("call %d: end: %v", call, err)
		}
	}
}
