package waypoint_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// routeBed is the pod bed (podBed) with HTTP apps on port 80 (declared http) and 7070 (gRPC),
// and the waypoint with the given HTTPRoutes and GRPCRoutes. The apps answer with what they
// got, as the conformance suite's echo.
type routeBed struct {
	*podBed
	mirrored chan echoed  // requests the app saw with X-Mirror-Probe set
	flaky    atomic.Int64 // requests to /flaky: all but every third answer 503
}

type echoed struct {
	Pod     string      `json:"pod"`
	Method  string      `json:"method"`
	Path    string      `json:"path"`
	Host    string      `json:"host"`
	Headers http.Header `json:"headers"`
}

func newRouteBed(t *testing.T, tweak func(*waypoint.Handler), routes ...string) *routeBed {
	b := &routeBed{mirrored: make(chan echoed, 16)}
	appPort := freePort(t)
	ports := []route.Port{{Name: "http", Port: 80, TargetPort: uint16(appPort)}, {Name: "grpc", Port: 7070, TargetPort: uint16(appPort), AppProtocol: "grpc"}}
	b.podBed = newPodBed(t, ports, func(ip, sa string) { b.serveApp(t, listen(t, ip, appPort), sa) }, func(h *waypoint.Handler, table *route.Table) {
		grpcs, https := kinds(routes, "GRPCRoute")
		rt, err := httproute.Compile(table, "demo", decodeAll(t, https, httproute.DecodeHTTPRoute), decodeAll(t, grpcs, httproute.DecodeGRPCRoute))
		if err != nil {
			t.Fatal(err)
		}
		engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, nil)
		h.Policies = func() *authz.Engine { return engine }
		h.HTTPRoutes = func() *httproute.Table { return rt }
		if tweak != nil {
			tweak(h)
		}
	})
	return b
}

// serveApp serves pod's HTTP app (HTTP/1.1 and HTTP/2 prior knowledge) on l until the test ends.
func (b *routeBed) serveApp(t *testing.T, l net.Listener, pod string) {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	as := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e := echoed{Pod: pod, Method: r.Method, Path: r.URL.RequestURI(), Host: r.Host, Headers: r.Header}
		if r.Header.Get("X-Mirror-Probe") != "" {
			select {
			case b.mirrored <- e:
			default:
			}
		}
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
			}
		}
		w.Header().Set("X-Pod", pod)
		if strings.HasPrefix(r.URL.Path, "/flaky") && b.flaky.Add(1)%3 != 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(w).Encode(e)
	})}
	go as.Serve(l)
	t.Cleanup(func() { as.Close() })
}

func (b *routeBed) httpClient(t *testing.T) *http.Client {
	var p http.Protocols
	p.SetHTTP1(true)
	tr := &http.Transport{Protocols: &p, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return b.client.Dial(ctx, b.waypoint, addr, b.opts)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

type answer struct {
	code int
	hdr  http.Header
	echo echoed
	body string
}

func (b *routeBed) do(t *testing.T, c *http.Client, method, url string, hdr ...string) answer {
	t.Helper()
	code, body, header := send(t, c, method, url, nil, hdr...)
	a := answer{code: code, hdr: header, body: body}
	json.Unmarshal([]byte(body), &a.echo)
	return a
}

const routeMatching = `
metadata: {name: mesh-matching, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /none}}]
    backendRefs: [{name: nosuch, port: 80}]
  - matches: [{path: {type: Exact, value: /empty}}]
    backendRefs: [{name: empty, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten, path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Set, value: set}], add: [{name: X-Add, value: added}], remove: [X-Remove]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Resp, value: r}]}
    backendRefs:
    - name: echo-v2
      port: 80
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Backend, value: v2}]}}]
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 308}}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 200ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters:
    - type: CORS
      cors: {allowOrigins: ["https://app.example.com"], allowMethods: [GET, PUT], allowHeaders: [x-token], exposeHeaders: [x-trace], maxAge: 60}
    backendRefs: [{name: echo-v1, port: 80}]
`

// Requests to a routed service go where its HTTPRoute says, over HBONE to that backend's pods,
// checked against that backend's identity; filters, redirects, 404, 500 and 503 as the spec.
func TestHTTPRouteThroughWaypoint(t *testing.T) {
	b := newRouteBed(t, nil, routeMatching)
	c := b.httpClient(t)
	for _, tc := range []struct {
		path, version string
		code          int
		pod           string
	}{
		{"/", "", 200, "echo-v1"}, {"/example", "", 200, "echo-v1"}, {"/", "one", 200, "echo-v1"},
		{"/v2", "", 200, "echo-v2"}, {"/v2/example", "", 200, "echo-v2"}, {"/", "two", 200, "echo-v2"},
		{"/v2example", "", 200, "echo-v1"}, {"/foo/v2/example", "", 200, "echo-v1"},
		{"/none", "", 500, ""}, {"/empty", "", 503, ""},
	} {
		a := b.do(t, c, "GET", "http://10.96.0.30"+tc.path, "Version", tc.version)
		if a.code != tc.code || a.echo.Pod != tc.pod {
			t.Errorf("GET %s (version %q) = %d from %q, want %d from %q (%s)", tc.path, tc.version, a.code, a.echo.Pod, tc.code, tc.pod, a.body)
		}
	}
	a := b.do(t, c, "GET", "http://10.96.0.30/prefix/one/two?q=1", "X-Remove", "x", "X-Add", "orig")
	if e := a.echo; a.code != 200 || e.Pod != "echo-v2" || e.Path != "/one/two?q=1" || e.Host != "rewritten" ||
		e.Headers.Get("X-Set") != "set" || strings.Join(e.Headers["X-Add"], ",") != "orig,added" || e.Headers.Get("X-Remove") != "" ||
		e.Headers.Get("X-Backend") != "v2" || a.hdr.Get("X-Resp") != "r" {
		t.Errorf("rewrite and header filters: %d %+v, response headers %v", a.code, e, a.hdr)
	}
	a = b.do(t, c, "GET", "http://10.96.0.30/redirect/x?y=1")
	if a.code != 308 || a.hdr.Get("Location") != "https://example.org/redirect/x?y=1" {
		t.Errorf("redirect: %d Location %q", a.code, a.hdr.Get("Location"))
	}
	a = b.do(t, c, "GET", "http://10.96.0.30/slow?sleep=5s")
	if a.code != 504 || a.body != "upstream request timeout" {
		t.Errorf("timeouts.request: %d %q, want 504", a.code, a.body)
	}
	a = b.do(t, c, "GET", "http://10.96.0.30/mirror", "X-Mirror-Probe", "1")
	if a.code != 200 || a.echo.Pod != "echo-v1" {
		t.Errorf("mirrored request answered %d by %q, want echo-v1", a.code, a.echo.Pod)
	}
	if m := <-b.mirrored; m.Pod == "echo-v1" {
		m = <-b.mirrored
		if m.Pod != "echo-v2" || m.Path != "/mirror" {
			t.Errorf("mirror copy %+v, want echo-v2 /mirror", m)
		}
	}
	// CORS: the preflight is the waypoint's answer (no pod sees it), the request's response
	// carries the headers.
	a = b.do(t, c, "OPTIONS", "http://10.96.0.30/cors", "Origin", "https://app.example.com", "Access-Control-Request-Method", "PUT",
		"Access-Control-Request-Headers", "x-token")
	if h := a.hdr; a.code != 200 || a.echo.Pod != "" || h.Get("Access-Control-Allow-Origin") != "https://app.example.com" ||
		h.Get("Access-Control-Allow-Methods") != "GET,PUT" || h.Get("Access-Control-Allow-Headers") != "x-token" || h.Get("Access-Control-Max-Age") != "60" {
		t.Errorf("CORS preflight: %d from %q, %v", a.code, a.echo.Pod, h)
	}
	a = b.do(t, c, "GET", "http://10.96.0.30/cors", "Origin", "https://app.example.com")
	if a.code != 200 || a.echo.Pod != "echo-v1" || a.hdr.Get("Access-Control-Allow-Origin") != "https://app.example.com" || a.hdr.Get("Access-Control-Expose-Headers") != "x-trace" {
		t.Errorf("CORS request: %d from %q, %v", a.code, a.echo.Pod, a.hdr)
	}
	if a = b.do(t, c, "GET", "http://10.96.0.30/cors", "Origin", "https://evil.test"); a.code != 200 || a.hdr.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("CORS request from another origin: %d, %v", a.code, a.hdr)
	}
	// A service without routes keeps the default forwarding.
	if a := b.do(t, c, "GET", "http://10.96.0.31/x"); a.code != 200 || a.echo.Pod != "echo-v1" {
		t.Errorf("unrouted service: %d from %q", a.code, a.echo.Pod)
	}
}

// A rule that matches nothing on a routed service is 404 (attached routes, no match).
func TestHTTPRouteNoMatchIs404(t *testing.T) {
	b := newRouteBed(t, nil, `
metadata: {name: only, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo}]
  rules: [{matches: [{path: {type: Exact, value: /only}}], backendRefs: [{name: echo-v1, port: 80}]}]
`)
	c := b.httpClient(t)
	if a := b.do(t, c, "GET", "http://10.96.0.30/other"); a.code != 404 {
		t.Errorf("unmatched request: %d %q, want 404", a.code, a.body)
	}
	if a := b.do(t, c, "GET", "http://10.96.0.30/only"); a.code != 200 || a.echo.Pod != "echo-v1" {
		t.Errorf("matched request: %d from %q", a.code, a.echo.Pod)
	}
}

// Weights are drawn per request: with the draw injected, 70/30 over 100 requests on one
// connection is exact.
func TestHTTPRouteWeightsPerRequest(t *testing.T) {
	var n atomic.Int64
	b := newRouteBed(t, func(h *waypoint.Handler) { h.RouteRand = func(max int) int { return int(n.Add(1)-1) % max } }, `
metadata: {name: split, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v1, port: 80, weight: 70}, {name: echo-v2, port: 80, weight: 30}]
`)
	c := b.httpClient(t)
	counts := map[string]int{}
	var mu sync.Mutex
	for range 100 {
		a := b.do(t, c, "GET", "http://10.96.0.30/")
		mu.Lock()
		counts[a.echo.Pod]++
		mu.Unlock()
	}
	if counts["echo-v1"] != 70 || counts["echo-v2"] != 30 {
		t.Errorf("70/30 split over 100 requests: %v", counts)
	}
}

// GRPCRoute: service and method matches in the spec's precedence, header matches and
// modifiers; an unmatched method is gRPC's UNIMPLEMENTED in a trailers-only answer.
func TestGRPCRouteThroughWaypoint(t *testing.T) {
	b := newRouteBed(t, nil, `
kind: GRPCRoute
metadata: {name: grpc, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 7070}]
  rules:
  - matches: [{method: {service: shop.Cart, method: Get}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-grpc, value: get}]}}]
    backendRefs: [{name: echo-v1, port: 7070}]
  - matches: [{method: {service: shop.Cart}}]
    backendRefs: [{name: echo-v2, port: 7070}]
  - matches: [{method: {type: RegularExpression, service: "shop\\.(Orders|Items)", method: "Li.*"}, headers: [{name: tenant, value: a}]}]
    backendRefs: [{name: echo-v1, port: 7070}]
`)
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return b.client.Dial(ctx, b.waypoint, addr, b.opts)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for _, tc := range []struct {
		path, tenant, pod, grpcStatus, header string
	}{
		{"/shop.Cart/Get", "", "echo-v1", "", "get"},
		{"/shop.Cart/Put", "", "echo-v2", "", ""},
		{"/shop.Orders/List", "a", "echo-v1", "", ""},
		{"/shop.Orders/List", "b", "", "12", ""},
		{"/other.Svc/Get", "", "", "12", ""},
	} {
		a := b.do(t, c, "POST", "http://10.96.0.30:7070"+tc.path, "Content-Type", "application/grpc", "Tenant", tc.tenant)
		if a.code != 200 || a.echo.Pod != tc.pod || a.hdr.Get("Grpc-Status") != tc.grpcStatus || a.echo.Headers.Get("X-Grpc") != tc.header {
			t.Errorf("%s (tenant %q): %d from %q, grpc-status %q, x-grpc %q; want %q, %q, %q", tc.path, tc.tenant, a.code, a.echo.Pod,
				a.hdr.Get("Grpc-Status"), a.echo.Headers.Get("X-Grpc"), tc.pod, tc.grpcStatus, tc.header)
		}
	}
}

// retry: a body-less request answered 503 is tried again, up to attempts more times; with no
// retry the 503 goes back.
func TestHTTPRouteRetry(t *testing.T) {
	b := newRouteBed(t, nil, `
metadata: {name: retry, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {value: /flaky/retried}}]
    retry: {attempts: 2, codes: [503], backoff: 1ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /flaky/once}}]
    backendRefs: [{name: echo-v1, port: 80}]
`)
	c := b.httpClient(t)
	if a := b.do(t, c, "GET", "http://10.96.0.30/flaky/retried"); a.code != 200 || b.flaky.Load() != 3 {
		t.Errorf("retried request: %d after %d tries, want 200 after 3", a.code, b.flaky.Load())
	}
	if a := b.do(t, c, "GET", "http://10.96.0.30/flaky/once"); a.code != 503 || b.flaky.Load() != 4 {
		t.Errorf("request without retry: %d after %d tries in all, want 503 after 4", a.code, b.flaky.Load())
	}
}
