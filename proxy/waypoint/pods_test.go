package waypoint_test

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// podBed is the mesh the route tests share (HTTPRoutes, GRPCRoutes, TCPRoutes, TLSRoutes, and
// sessions with them): pods echo-v1 (127.0.0.2) and echo-v2 (127.0.0.3), each behind its own
// ztunnel (an hbone.Forwarder, presenting the pod's service account), the services echo
// (10.96.0.30, both pods), echo-v1 (.31), echo-v2 (.32) and empty (.33, no endpoint) in
// namespace demo, and detour's waypoint for them; the client demo/client dials the waypoint.
type podBed struct {
	waypoint string
	client   *hbone.Dialer
	opts     hbone.DialOptions
	handler  *waypoint.Handler
	id       func(string) identity.Source
}

// newPodBed gives every service the ports ports; apps starts a pod's applications (on ip, the
// pod's service account sa) on those ports' TargetPorts. setup completes the waypoint's handler
// (routes, sessions, metrics) with the service table before it serves.
func newPodBed(t *testing.T, ports []route.Port, apps func(ip, sa string), setup func(h *waypoint.Handler, table *route.Table)) *podBed {
	_, id := testCA(t)
	b := &podBed{id: id}
	hbonePort := freePort(t)
	for i, sa := range []string{"echo-v1", "echo-v2"} {
		ip := fmt.Sprintf("127.0.0.%d", i+2)
		apps(ip, sa)
		hs := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(id("spiffe://cluster.local/ns/demo/sa/"+sa), nil), Logger: quiet}
		go hs.Serve(listen(t, ip, hbonePort))
		t.Cleanup(func() { hs.Close() })
	}
	ep := func(i int, sa string) route.Endpoint {
		return route.Endpoint{IP: netip.MustParseAddr(fmt.Sprintf("127.0.0.%d", i)), Ready: true, ServiceAccount: sa}
	}
	svc := func(name string, vip byte, eps ...route.Endpoint) *route.Service {
		return &route.Service{Name: name, Namespace: "demo", Hostname: name + ".demo.svc.cluster.local",
			VIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, vip})}, Ports: ports, Endpoints: eps}
	}
	table, err := route.NewTable([]*route.Service{
		svc("echo", 30, ep(2, "echo-v1"), ep(3, "echo-v2")), svc("echo-v1", 31, ep(2, "echo-v1")),
		svc("echo-v2", 32, ep(3, "echo-v2")), svc("empty", 33),
	})
	if err != nil {
		t.Fatal(err)
	}
	wpID := id("spiffe://cluster.local/ns/demo/sa/waypoint")
	onward := &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { onward.Close() })
	b.handler = &waypoint.Handler{Routes: func() *route.Table { return table }, Balancer: &route.Balancer{}, Identity: wpID,
		Dialer: onward, HBONEPort: uint16(hbonePort), Logger: quiet}
	setup(b.handler, table)
	b.waypoint = serveWaypoint(t, b.handler, wpID)
	cliTLS, _ := identity.ClientTLS(id("spiffe://cluster.local/ns/demo/sa/client"), spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/waypoint"))
	b.opts = hbone.DialOptions{TLSConfig: cliTLS}
	b.client = &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { b.client.Close() })
	return b
}

// serveWaypoint serves h as the waypoint wpID on a loopback port until the test ends.
func serveWaypoint(t *testing.T, h *waypoint.Handler, wpID identity.Source) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &hbone.Server{Handler: h, TLSConfig: identity.ServerTLS(wpID, nil), Logger: quiet}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// listen listens on ip:port, or skips the test when another process holds it.
func listen(t *testing.T, ip string, port int) net.Listener {
	l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
	if err != nil {
		t.Skipf("port %d not free on %s: %v", port, ip, err)
	}
	return l
}

// kinds splits YAML documents into those of kind and the others.
func kinds(docs []string, kind string) (of, others []string) {
	for _, d := range docs {
		if strings.Contains(d, "kind: "+kind) {
			of = append(of, d)
		} else {
			others = append(others, d)
		}
	}
	return of, others
}

// decodeAll decodes each document with decode.
func decodeAll[T any](t *testing.T, docs []string, decode func([]byte) (T, error)) []T {
	t.Helper()
	var out []T
	for _, d := range docs {
		r, err := decode([]byte(d))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}
