package waypoint_test

import (
	"encoding/json"
	"net"
	"net/http"
	"testing"

	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// routeSessions is the route bed with debug sessions (developers): alice's app answers as pod
// "developer" with what it got.
type routeSessions struct {
	*routeBed
	*developers
	reg    *session.Registry
	app    string
	copies chan echoed // what the developer's app received
}

func newRouteSessions(t *testing.T, routes ...string) *routeSessions {
	rs := &routeSessions{reg: &session.Registry{}, copies: make(chan echoed, 16)}
	rs.routeBed = newRouteBed(t, func(h *waypoint.Handler) { h.Sessions = rs.reg }, routes...)
	rs.developers = serveDevelopers(t, rs.handler, rs.reg, nil, rs.id("spiffe://cluster.local/ns/dev/sa/alice"))
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

// register registers spec as alice, her streams going to the app until the test ends.
func (rs *routeSessions) register(t *testing.T, spec tunnel.Spec) {
	t.Helper()
	rs.developer(t, rs.tunnel, spec, rs.app)
}

var aliceOnly = tunnel.Filter{Header: "x-dev", HeaderValue: "alice"}

// A steal on the service the client addressed takes alice's requests as the client sent them
// (before any route: path and host unrewritten), and every other request still goes where the
// route says (proxy/README.md, "Routes and sessions").
func TestStealOnRoutedService(t *testing.T) {
	rs := newRouteSessions(t, routeMatching)
	rs.register(t, tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Steal, Filter: aliceOnly})
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
	rs.register(t, tunnel.Spec{Namespace: "demo", Service: "echo-v2", Port: 80, Mode: session.Steal, Filter: aliceOnly})
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
	rs.register(t, tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Mirror})
	c := rs.httpClient(t)
	if a := rs.do(t, c, "GET", "http://10.96.0.30/v2/x"); a.code != 200 || a.echo.Pod != "echo-v2" {
		t.Errorf("mirrored request: %d from %q, want echo-v2 as the route says", a.code, a.echo.Pod)
	}
	if m := <-rs.copies; m.Path != "/v2/x" {
		t.Errorf("the developer's copy: %+v, want /v2/x as sent", m)
	}
}
