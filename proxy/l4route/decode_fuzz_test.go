package l4route

import (
	"testing"

	"go.yaml.in/yaml/v3"
)

// Any document either fails to decode or compile with an error, or compiles into a table that
// matches streams and draws backends without panicking.
func FuzzDecodeCompile(f *testing.F) {
	f.Add([]byte(tcpRoute))
	f.Add([]byte(tlsWild))
	f.Add([]byte(`{kind: TLSRoute, metadata: {name: a, namespace: shop}, spec: {parentRefs: [{name: db, port: 443}], hostnames: [a.b, "*.c"], rules: [{backendRefs: [{name: db-v1, port: 443, weight: 0}]}]}}`))
	svcs := services(f)
	f.Fuzz(func(t *testing.T, doc []byte) {
		var node yaml.Node
		if yaml.Unmarshal(doc, &node) == nil && len(node.Content) > 0 {
			CheckYAML(node.Content[0], false, "r")
			CheckYAML(node.Content[0], true, "r")
		}
		var tcps []*TCPRoute
		var tlss []*TLSRoute
		if r, err := DecodeTCPRoute(doc); err == nil {
			tcps = append(tcps, r)
		}
		if r, err := DecodeTLSRoute(doc); err == nil {
			tlss = append(tlss, r)
		}
		for _, waypointNS := range []string{"shop", "other"} {
			tbl, _ := Compile(svcs, waypointNS, tcps, tlss)
			for _, port := range []uint16{443, 5432} {
				rs := tbl.For("shop", "db", port)
				for _, sni := range []string{"", "a.b", "x.c", "C.", "."} {
					if rule := rs.Match(true, sni); rule != nil {
						rule.Pick(func(n int) int { return n - 1 })
					}
				}
				rs.Match(false, "")
			}
		}
	})
}
