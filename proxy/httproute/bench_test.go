package httproute

import (
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
)

// BenchmarkMatch is the matcher's cost per request: 100 rules that a request is checked against
// (99 Exact paths with a method and a header, then the PathPrefix / it matches), against a
// service port with no route.
func BenchmarkMatch(b *testing.B) {
	var doc strings.Builder
	doc.WriteString("metadata: {name: many, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: reviews, port: 80}]\n  rules:\n")
	for i := range 99 {
		fmt.Fprintf(&doc, "  - matches: [{path: {type: Exact, value: /r%d}, method: GET, headers: [{name: x-tenant, value: t%d}]}]\n    backendRefs: [{name: reviews-v1, port: 80}]\n", i, i)
	}
	doc.WriteString("  - backendRefs: [{name: reviews-v2, port: 80}]\n")
	tbl, err := Compile(services(b), "shop", []*HTTPRoute{mustHTTP(b, doc.String())}, nil)
	if err != nil {
		b.Fatal(err)
	}
	r := httptest.NewRequest("POST", "/echo/item", nil)
	r.Header.Set("X-Tenant", "t42")
	for _, tc := range []struct {
		name string
		port uint16
	}{{"none", 7070}, {"100-rules", 80}} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				m, attached := tbl.Match("shop", "reviews", tc.port, r, "/echo/item", false)
				if attached && m.Rule.Pick(func(int) int { return 0 }).Name != "reviews-v2" {
					b.Fatal("wrong rule")
				}
			}
		})
	}
}
