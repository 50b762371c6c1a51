package waypoint_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"testing"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// routeSessions is the route bed with debug sessions: developer alice may steal and mirror, and
// her app answers as pod "developer" with what it got.
type routeSessions struct {
	*routeBed
	reg    *session.Registry
	tunnel string
	app    string
	copies chan echoed // what the developer's app received
}

func newRouteSessions(t *testing.T, routes ...string) *routeSessions {
	rs := &routeSessions{reg: &session.Registry{}, copies: make(chan echoed, 16)}
	rs.routeBed = newRouteBed(t, func(h *waypoint.Handler) { h.Sessions = rs.reg }, routes...)
	h := rs.handler
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{{Namespace: "demo", Name: "alice",
		Spec: &secv1beta1.AuthorizationPolicy{Action: secv1beta1.AuthorizationPolicy_ALLOW,
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
			Rules: []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{"cluster.local/ns/dev/sa/alice"}}}},
				To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"STEAL", "MIRROR"}}}}}}}}})
	m := &session.Manager{Registry: rs.reg, Routes: h.Routes, Policies: func() *authz.Engine { return engine },
		Namespace: "demo", Gateway: "detour", Logger: quiet}
	srv := &tunnel.Server{Identity: h.Identity, Handler: m.ServeTunnel, Logger: quiet}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.ServeQUIC(ctx, pc); close(done) }()
	t.Cleanup(func() { cancel(); <-done; pc.Close() })
	rs.tunnel = pc.LocalAddr().String()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e := echoed{Pod: "developer", Method: r.Method, Path: r.URL.RequestURI(), Host: r.Host, Headers: r.Header}
		select {
		case rs.copies <- e:
		default:
		}
		json.NewEncoder(w).Encode(e)
	})}
	go app.Serve(l)
	t.Cleanup(func() { app.Close() })
	rs.app = l.Addr().String()
	return rs
}

// developer registers spec as alice and forwards her streams to the app until the test ends.
func (rs *routeSessions) developer(t *testing.T, spec tunnel.Spec) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tn, err := tunnel.Dial(ctx, "quic", rs.tunnel, rs.id("spiffe://cluster.local/ns/dev/sa/alice"), nil, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if err := tunnel.WriteMsg(tn.Control(), tunnel.Hello{Register: &spec}); err != nil {
		t.Fatal(err)
	}
	var r tunnel.Reply
	if err := tunnel.ReadMsg(tn.Control(), &r); err != nil || !r.OK {
		t.Fatalf("registering: %+v %v", r, err)
	}
	fctx, fcancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tn.Forward(fctx, rs.app, nil); close(done) }()
	t.Cleanup(func() { fcancel(); tn.Close(); <-done })
}

var aliceOnly = tunnel.Filter{Header: "x-dev", HeaderValue: "alice"}

// A steal on the service the client addressed takes alice's requests as the client sent them
// (before any route: path and host unrewritten), and every other request still goes where the
// route says (proxy/README.md, "Routes and sessions").
func TestStealOnRoutedService(t *testing.T) {
	rs := newRouteSessions(t, routeMatching)
	rs.developer(t, tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Steal, Filter: aliceOnly})
	c := rs.httpClient(t)
	a := rs.do(t, c, "GET", "http://10.96.0.30/prefix/one/two", "X-Dev", "alice")
	if a.code != 200 || a.echo.Pod != "developer" || a.echo.Path != "/prefix/one/two" || a.echo.Host != "10.96.0.30" || a.echo.Headers.Get("X-Set") != "" {
		t.Errorf("alice's request: %d %+v, want the developer with the request as sent", a.code, a.echo)
	}
	for path, pod := range map[string]string{"/v2": "echo-v2", "/": "echo-v1"} {
		if a := rs.do(t, c, "GET", "http://10.96.0.30"+path, "X-Dev", "bob"); a.code != 200 || a.echo.Pod != pod {
			t.Errorf("another caller's %s: %d from %q, want %s as the route says", path, a.code, a.echo.Pod, pod)
		}
	}
}

// A steal on a service reached only as a route's backend takes alice's requests the route sends
// there, as that backend would get them (rewritten, with the rule's headers); alice's requests
// the route sends elsewhere, and everyone else's, are routed untouched.
func TestStealOnRouteBackend(t *testing.T) {
	rs := newRouteSessions(t, routeMatching)
	rs.developer(t, tunnel.Spec{Namespace: "demo", Service: "echo-v2", Port: 80, Mode: session.Steal, Filter: aliceOnly})
	c := rs.httpClient(t)
	a := rs.do(t, c, "GET", "http://10.96.0.30/prefix/one/two", "X-Dev", "alice")
	if e := a.echo; a.code != 200 || e.Pod != "developer" || e.Path != "/one/two" || e.Host != "rewritten" || e.Headers.Get("X-Set") != "set" || e.Headers.Get("X-Backend") != "v2" {
		t.Errorf("alice's request routed to echo-v2: %d %+v, want the developer with what echo-v2 would get", a.code, e)
	}
	if a := rs.do(t, c, "GET", "http://10.96.0.30/", "X-Dev", "alice"); a.echo.Pod != "echo-v1" {
		t.Errorf("alice's request routed to echo-v1 reached %q", a.echo.Pod)
	}
	if a := rs.do(t, c, "GET", "http://10.96.0.30/prefix/one/two", "X-Dev", "bob"); a.echo.Pod != "echo-v2" {
		t.Errorf("another caller's request routed to echo-v2 reached %q", a.echo.Pod)
	}
}

// A mirror on a routed service gets a copy of each request as sent, and the request itself
// still goes where the route says.
func TestMirrorOnRoutedService(t *testing.T) {
	rs := newRouteSessions(t, routeMatching)
	rs.developer(t, tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Mirror})
	c := rs.httpClient(t)
	if a := rs.do(t, c, "GET", "http://10.96.0.30/v2/x"); a.code != 200 || a.echo.Pod != "echo-v2" {
		t.Errorf("mirrored request: %d from %q, want echo-v2 as the route says", a.code, a.echo.Pod)
	}
	if m := <-rs.copies; m.Path != "/v2/x" {
		t.Errorf("the developer's copy: %+v, want /v2/x as sent", m)
	}
}
