package l4route

import (
	"fmt"
	"strings"
	"testing"
)

// BenchmarkMatch is the table's cost per connection: For, Match and Pick on a port with no
// route, with one TCPRoute, and with 100 TLSRoutes of exact hostnames that a wildcard's SNI is
// checked past (the worst case: every exact entry before the wildcard).
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
	tbl, err := Compile(services(b), []*TCPRoute{tcp}, tlss)
	if err != nil {
		b.Fatal(err)
	}
	one := func(int) int { return 0 }
	for _, tc := range []struct {
		name, svc string
		port      uint16
		tls       bool
	}{{"none", "db-v3", 5432, false}, {"tcp", "db", 5432, false}, {"100-tls", "db", 443, true}} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				rs := tbl.For("shop", tc.svc, tc.port, "shop")
				if rs == nil {
					continue
				}
				if r := rs.Match(tc.tls, "api.EXAMPLE.com"); r == nil || !strings.HasPrefix(r.Pick(one).Name, "db-v") {
					b.Fatal("wrong rule")
				}
			}
		})
	}
}
