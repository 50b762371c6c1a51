package httproute

import (
	"net/http/httptest"
	"testing"

	"go.yaml.in/yaml/v3"
)

// Any document either fails to decode or compile with an error, or compiles into a table that
// matches requests without panicking.
func FuzzDecodeCompile(f *testing.F) {
	f.Add([]byte(matching))
	f.Add([]byte(`{metadata: {name: a, namespace: shop}, spec: {parentRefs: [{name: reviews}], rules: [{matches: [{path: {type: RegularExpression, value: "/x+"}, queryParams: [{name: q, value: "1"}]}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /y}}}]}]}}`))
	f.Add([]byte(`{kind: GRPCRoute, metadata: {name: g, namespace: shop}, spec: {parentRefs: [{name: reviews}], rules: [{matches: [{method: {service: a.B, method: C}}]}]}}`))
	svcs := services(f)
	f.Fuzz(func(t *testing.T, doc []byte) {
		var node yaml.Node
		if yaml.Unmarshal(doc, &node) == nil && len(node.Content) > 0 {
			CheckYAML(node.Content[0], false, "r")
		}
		hr, herr := DecodeHTTPRoute(doc)
		gr, gerr := DecodeGRPCRoute(doc)
		var hrs []*HTTPRoute
		var grs []*GRPCRoute
		if herr == nil {
			hrs = append(hrs, hr)
		}
		if gerr == nil {
			grs = append(grs, gr)
		}
		tbl, _ := Compile(svcs, "mesh", hrs, grs) // the waypoint elsewhere: routes of shop and of mesh apply
		for _, target := range []string{"/", "/v2/x?q=1", "/a.B/C", "/x"} {
			r := httptest.NewRequest("POST", target, nil)
			r.Header.Set("Version", "two")
			for _, grpc := range []bool{false, true} {
				m, _ := tbl.Match("shop", "reviews", 80, r, r.URL.EscapedPath(), grpc)
				if m.Rule == nil {
					continue
				}
				m.Rule.Pick(func(n int) int { return n - 1 })
				if m.Rule.Redirect != nil {
					m.Rule.Redirect.Location(r, r.URL.EscapedPath(), m.Prefix, 80)
				}
				m.Rule.Rewrite.Apply(r, r.URL.EscapedPath(), m.Prefix)
				m.Rule.RequestHeaders.Apply(r.Header)
			}
		}
	})
}
