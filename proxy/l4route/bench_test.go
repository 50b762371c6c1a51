package l4route

import (
	"fmt"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// BenchmarkMatch is the table's cost per connection: For, Match and Pick on a port with no
// route, with one TCPRoute, and with 100 TLSRoutes of exact hostnames that a wildcard's SNI is
// checked past (the worst case: every exact entry before the wildcard). The "+sessions" cases
// add what the waypoint does next for a routed connection when debug sessions are on: the drawn
// backend's sessions looked up (proxy/waypoint l4Choose: a session on a backend sees the
// streams drawn for it), in a registry holding a session on another service, so the lookup
// misses as it does for every stream no session is about.
func BenchmarkMatch(b *testing.B) {
	var tlss []*TLSRoute
	for i := range 100 {
		host := fmt.Sprintf("h%d.example.com", i)
		if i == 99 {
			host = "*.example.com"
		}
		r, err := DecodeTLSRoute([]byte(`{metadata: {name: r` + fmt.Sprint(i) + `, namespace: shop}, spec: {parentRefs: [{name: db, port: 443}], hostnames: ["` + host + `"], rules: [{backendRefs: [{name: db-v1, port: 443}]}]}}`))
		if err != nil {
			b.Fatal(err)
		}
		tlss = append(tlss, r)
	}
	tcp, err := DecodeTCPRoute([]byte(tcpRoute))
	if err != nil {
		b.Fatal(err)
	}
	tbl, err := Compile(services(b), "shop", []*TCPRoute{tcp}, tlss)
	if err != nil {
		b.Fatal(err)
	}
	elsewhere := &session.Registry{}
	s, err := session.New(tunnel.Spec{Namespace: "shop", Service: "cart", Port: 80, Mode: session.Steal}, "cart.shop.svc.cluster.local",
		spiffeid.RequireFromString("spiffe://cluster.local/ns/dev/sa/alice"), nil)
	if err != nil {
		b.Fatal(err)
	}
	if err := elsewhere.Add(s); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { elsewhere.Remove(s) })
	one := func(int) int { return 0 }
	for _, tc := range []struct {
		name, svc string
		port      uint16
		tls       bool
		sessions  *session.Registry // nil: a waypoint without sessions (the lookup returns at once)
	}{{"none", "db-v3", 5432, false, nil}, {"tcp", "db", 5432, false, nil}, {"tcp+sessions", "db", 5432, false, elsewhere},
		{"100-tls", "db", 443, true, nil}, {"100-tls+sessions", "db", 443, true, elsewhere}} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				rs := tbl.For("shop", tc.svc, tc.port)
				if rs == nil {
					continue
				}
				r := rs.Match(tc.tls, "api.EXAMPLE.com")
				if r == nil {
					b.Fatal("no rule")
				}
				be := r.Pick(one)
				if !strings.HasPrefix(be.Name, "db-v") || tc.sessions.For(be.Namespace, be.Name, be.Port) != nil {
					b.Fatal("wrong backend, or sessions on it")
				}
			}
		})
	}
}
