package interop

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

const l4Routes = `
kind: TCPRoute
metadata: {name: split, namespace: demo}
spec:
  parentRefs: [{name: web, port: 82}]
  rules: [{backendRefs: [{name: web-a, port: 82, weight: 3}, {name: web-b, port: 82, weight: 1}]}]
---
kind: TLSRoute
metadata: {name: exact, namespace: demo}
spec:
  parentRefs: [{name: web, port: 443}]
  hostnames: [web.example.com]
  rules: [{backendRefs: [{name: web-b, port: 443}]}]
---
kind: TLSRoute
metadata: {name: wildcard, namespace: demo}
spec:
  parentRefs: [{name: web, port: 443}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: web-a, port: 443}]}]
`

// Istio's Go HBONE client as the source, detour as the waypoint with a TCPRoute and TLSRoutes
// on service web, Istio's Go HBONE server as each pod's ztunnel. Streams arrive byte-exact at
// the backends the routes name: a 3:1 TCP split counted per connection (weights drawn by a
// counter, so the count is exact), TLS by the ClientHello's SNI (exact before wildcard), and a
// stream whose SNI no route takes is reset before any byte reaches a pod.
func TestIstioL4RoutesThroughDetourWaypoint(t *testing.T) {
	it.QuietIstio()
	p := it.NewPKI(t)
	quiet := slog.New(slog.DiscardHandler)
	issue := func(id string) identity.Source { return p.Source(t, id) }
	hbonePort := it.FreePort(t, "127.0.0.2")
	cert, pool := selfSigned(t, "web.example.com")
	seen := &pods{hits: map[string]int{}}
	podID := issue("spiffe://cluster.local/ns/demo/sa/web")
	ep := func(i int) route.Endpoint {
		return route.Endpoint{IP: netip.MustParseAddr(fmt.Sprintf("127.0.0.%d", i)), Ready: true, ServiceAccount: "web"}
	}
	for i := 2; i <= 3; i++ {
		startPod(t, fmt.Sprintf("127.0.0.%d", i), hbonePort, cert, podID, seen)
	}
	ports := []route.Port{{Name: "tcp", Port: appTCP - 8000, TargetPort: appTCP}, {Port: appTLS - 8000, TargetPort: appTLS}}
	svc := func(name string, vip byte, eps ...route.Endpoint) *route.Service {
		return &route.Service{Name: name, Namespace: "demo", Hostname: name + ".demo.svc.cluster.local",
			VIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, vip})}, Ports: ports, Endpoints: eps}
	}
	table, err := route.NewTable([]*route.Service{svc("web", 30, ep(2), ep(3)), svc("web-a", 31, ep(2)), svc("web-b", 32, ep(3))})
	if err != nil {
		t.Fatal(err)
	}
	var tcps []*l4route.TCPRoute
	var tlss []*l4route.TLSRoute
	for _, doc := range strings.Split(l4Routes, "---") {
		if strings.Contains(doc, "kind: TLSRoute") {
			r, err := l4route.DecodeTLSRoute([]byte(doc))
			if err != nil {
				t.Fatal(err)
			}
			tlss = append(tlss, r)
			continue
		}
		r, err := l4route.DecodeTCPRoute([]byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		tcps = append(tcps, r)
	}
	rt, err := l4route.Compile(table, "demo", tcps, tlss)
	if err != nil {
		t.Fatal(err)
	}
	var draws atomic.Int64
	onward := &hbone.Dialer{Logger: quiet}
	defer onward.Close()
	wp := it.DetourServer(t, p, &waypoint.Handler{Routes: func() *route.Table { return table }, Balancer: &route.Balancer{},
		Identity: issue(it.ServerID), Dialer: onward, HBONEPort: uint16(hbonePort), Logger: quiet,
		L4Routes: func() *l4route.Table { return rt }, RouteRand: func(n int) int { return int(draws.Add(1)-1) % n }})
	d := it.IstioDialer(p, wp.Addr().String())
	delta := func(before map[string]int) map[string]int {
		out := map[string]int{}
		for ip, n := range seen.spread() {
			if n -= before[ip]; n > 0 {
				out[ip] = n
			}
		}
		return out
	}

	t.Run("tcp-weights", func(t *testing.T) {
		before := seen.spread()
		for i := range 20 {
			c, err := d.DialContext(ctxT(t), "tcp", "10.96.0.30:82")
			if err != nil {
				t.Fatal(err)
			}
			echoCheck(t, c, 64<<10+i, nil)
			c.Close()
		}
		if got := delta(before); got["127.0.0.2"] != 15 || got["127.0.0.3"] != 5 {
			t.Errorf("20 connections over weights 3:1 (web-a on .2, web-b on .3): %v", got)
		}
	})
	t.Run("tls-sni", func(t *testing.T) {
		for _, tc := range []struct{ sni, pod string }{{"web.example.com", "127.0.0.3"}, {"api.example.com", "127.0.0.2"}} {
			before := seen.spread()
			for i := range 4 {
				raw, err := d.DialContext(ctxT(t), "tcp", "10.96.0.30:443")
				if err != nil {
					t.Fatal(err)
				}
				c := tls.Client(raw, &tls.Config{ServerName: tc.sni, RootCAs: pool, InsecureSkipVerify: tc.sni != "web.example.com"})
				echoCheck(t, c, 32<<10+i, c.CloseWrite)
				c.Close()
			}
			if got := delta(before); got[tc.pod] != 4 || len(got) != 1 {
				t.Errorf("SNI %s: %v, want 4 streams on %s", tc.sni, got, tc.pod)
			}
		}
		before := seen.spread()
		raw, err := d.DialContext(ctxT(t), "tcp", "10.96.0.30:443")
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		c := tls.Client(raw, &tls.Config{ServerName: "web.example.org", InsecureSkipVerify: true})
		if err := c.HandshakeContext(ctxT(t)); err == nil {
			t.Error("TLS with an SNI no TLSRoute takes got through")
		}
		if got := delta(before); len(got) != 0 {
			t.Errorf("the refused stream reached %v", got)
		}
	})
}
