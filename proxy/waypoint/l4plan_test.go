package waypoint

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Where TCPRoutes and TLSRoutes decide, planned without a socket: at CONNECT for a stream not
// sniffed (the backend drawn with its whole-stream sessions, or the refusal kept for after the
// sessions), after the 200 for one whose SNI or protocol decides; never on a port declared HTTP
// or for a pod IP.
func TestPlanL4Routes(t *testing.T) {
	ep := []route.Endpoint{{IP: netip.MustParseAddr("10.244.0.5"), Ready: true, ServiceAccount: "db"}}
	ports := []route.Port{{Name: "tcp", Port: 5432, TargetPort: 5432}, {Name: "data", Port: 9000, TargetPort: 9000},
		{Name: "http", Port: 80, TargetPort: 8080}, {Name: "tls", Port: 443, TargetPort: 8443}}
	svc := func(name, vip string, eps []route.Endpoint) *route.Service {
		return &route.Service{Name: name, Namespace: "demo", Hostname: name + ".demo.svc.cluster.local",
			VIPs: []netip.Addr{netip.MustParseAddr(vip)}, Ports: ports, Endpoints: eps}
	}
	table, err := route.NewTable([]*route.Service{svc("db", "10.96.0.10", ep), svc("db-v2", "10.96.0.11", ep),
		svc("empty", "10.96.0.12", nil), svc("front", "10.96.0.13", nil)})
	if err != nil {
		t.Fatal(err)
	}
	tcp := func(name, parent, backend string) *l4route.TCPRoute {
		r, err := l4route.DecodeTCPRoute([]byte(`{metadata: {name: ` + name + `, namespace: demo}, spec: {parentRefs: [{name: ` + parent + `}], rules: [{backendRefs: [{name: ` + backend + `, port: 5432}]}]}}`))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	tls, err := l4route.DecodeTLSRoute([]byte(`{metadata: {name: sni, namespace: demo}, spec: {parentRefs: [{name: db-v2, port: 5432}], hostnames: [a.example.com], rules: [{backendRefs: [{name: db, port: 5432}]}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := l4route.Compile(table, "demo", []*l4route.TCPRoute{tcp("split", "db", "db-v2"), tcp("dead", "empty", "empty"), tcp("front", "front", "db")}, []*l4route.TLSRoute{tls})
	if err != nil {
		t.Fatal(err)
	}
	// A whole-stream steal on db-v2:5432, a backend: planned with the streams drawn for it.
	reg := &session.Registry{}
	st := addSession(t, reg, tunnel.Spec{Namespace: "demo", Service: "db-v2", Port: 5432, Mode: session.Steal})
	h := &Handler{Routes: func() *route.Table { return table }, L4Routes: func() *l4route.Table { return rt }, Sessions: reg}
	for _, tc := range []struct {
		name, target string
		inspect      Inspect
		routes       bool   // L4 routes apply
		inspected    bool   // decided after the 200
		routed       string // the backend drawn at CONNECT
		refused      string // the refusal kept for after the sessions
	}{
		{name: "declared tcp: drawn at CONNECT", target: "10.96.0.10:5432", routes: true, routed: "db-v2"},
		{name: "undeclared: decided once sniffed", target: "10.96.0.10:9000", routes: true, inspected: true},
		{name: "undeclared, inspect opaque: drawn at CONNECT", target: "10.96.0.10:9000", inspect: InspectOpaque, routes: true, routed: "db-v2"},
		{name: "declared HTTP: no L4 route applies", target: "10.96.0.10:80", inspected: true},
		{name: "declared TLS, TCPRoute only: drawn at CONNECT", target: "10.96.0.10:443", routes: true, routed: "db-v2"},
		{name: "a TLSRoute on a declared tcp port: its SNI decides", target: "10.96.0.11:5432", routes: true, inspected: true},
		{name: "a pod IP is never routed", target: "10.244.0.5:5432"},
		{name: "a service without endpoints routed to one with", target: "10.96.0.13:5432", routes: true, routed: "db"},
		{name: "a backend without endpoints: refused after the sessions", target: "10.96.0.12:5432", routes: true,
			refused: "UH waypoint: hbone: upstream unavailable: TCPRoute demo/dead: route: no ready endpoint for demo/empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target, err := hbone.ParseTarget(tc.target)
			if err != nil {
				t.Fatal(err)
			}
			h.Inspect = tc.inspect
			p, err := h.plan(&hbone.Request{Target: target, PeerID: spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/curl"),
				RemoteAddr: &net.TCPAddr{IP: net.IPv4(10, 244, 1, 7), Port: 40000}})
			if err != nil {
				t.Fatalf("plan: %v", err)
			}
			routed := ""
			if p.route.dest != nil && p.route.err == nil {
				routed = p.route.dest.Service.Name
			}
			refused := ""
			if err := p.route.err; err != nil {
				refused = p.route.flags + " " + err.Error()
				if !errors.Is(err, hbone.ErrUnavailable) {
					t.Errorf("refusal %v is not a 503", err)
				}
			}
			if stolen := p.route.steal == st; stolen != (routed == "db-v2") {
				t.Errorf("plan: routed %q, the backend's steal planned %v", routed, stolen)
			}
			if (p.l4 != nil) != tc.routes || p.inspect != tc.inspected || routed != tc.routed || refused != tc.refused {
				t.Errorf("plan: routes %v, inspected %v, routed %q, refused %q; want %v, %v, %q, %q",
					p.l4 != nil, p.inspect, routed, refused, tc.routes, tc.inspected, tc.routed, tc.refused)
			}
		})
	}
}
