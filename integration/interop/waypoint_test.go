package interop

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"testing"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// Istio's Go HBONE client as the source, detour as the waypoint, Istio's Go HBONE server as each
// endpoint's ztunnel: opaque TCP arrives byte-exact, spread over three endpoints, and a dead
// fourth endpoint fails no request.
func TestIstioThroughDetourWaypoint(t *testing.T) {
	p := it.NewPKI(t)
	quiet := slog.New(slog.DiscardHandler)
	issue := func(id string) identity.Source { return p.Source(t, id) }
	port := it.FreePort(t, "127.0.0.2")
	backend := issue("spiffe://cluster.local/ns/demo/sa/echo")
	var eps []route.Endpoint
	hits := map[string]*it.CountingListener{}
	for i := 2; i <= 5; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		eps = append(eps, route.Endpoint{IP: netip.MustParseAddr(ip), Ready: true, ServiceAccount: "echo"})
		if i == 5 {
			continue // dead: nothing listens
		}
		l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			t.Skipf("port %d not free on %s", port, ip)
		}
		it.IstioServerOn(t, l, identity.ServerTLS(backend, nil))
		el, err := net.Listen("tcp", ip+":8080")
		if err != nil {
			t.Skipf("port 8080 not free on %s", ip)
		}
		echo := &it.CountingListener{Listener: el} // Istio's server dials the echo once per stream
		hits[ip] = echo
		t.Cleanup(func() { echo.Close() })
		go func() {
			for {
				c, err := echo.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); io.Copy(c, c) }()
			}
		}()
	}
	table, err := route.NewTable([]*route.Service{{Name: "echo", Namespace: "demo", Hostname: "echo.demo.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")}, Ports: []route.Port{{Name: "tcp", Port: 80, TargetPort: 8080}}, Endpoints: eps}})
	if err != nil {
		t.Fatal(err)
	}
	wpID := issue(it.ServerID)
	onward := &hbone.Dialer{Logger: quiet}
	defer onward.Close()
	wp := it.DetourServer(t, p, &waypoint.Handler{Routes: func() *route.Table { return table }, Balancer: &route.Balancer{},
		Identity: wpID, Dialer: onward, HBONEPort: uint16(port), Logger: quiet})

	d := it.IstioDialer(p, wp.Addr().String())
	for i := range 30 {
		c, err := d.DialContext(ctxT(t), "tcp", "10.96.0.10:80")
		if err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		msg := bytes.Repeat([]byte(fmt.Sprint(i)), 10000)
		c.Write(msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("stream %d: %v", i, err)
		}
		c.Close()
	}
	for ip, cl := range hits {
		if n := cl.Count(); n < 5 {
			t.Errorf("%s got %d of 30 streams", ip, n)
		}
	}
}
