package httproute

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/detour-mesh/detour/proxy/route"
)

func services(t testing.TB) *route.Table {
	t.Helper()
	var svcs []*route.Service
	for i, name := range []string{"reviews", "reviews-v1", "reviews-v2"} {
		svcs = append(svcs, &route.Service{Name: name, Namespace: "shop", Hostname: name + ".shop.svc.cluster.local",
			VIPs:  []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, byte(i + 1)})},
			Ports: []route.Port{{Name: "http", Port: 80, TargetPort: 8080}, {Name: "grpc", Port: 7070, TargetPort: 7070}}})
	}
	tbl, err := route.NewTable(svcs)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

func mustHTTP(t testing.TB, doc string) *HTTPRoute {
	t.Helper()
	r, err := DecodeHTTPRoute([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

const matching = `
metadata: {name: matching, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches:
    - path: {type: Exact, value: /exact}
      method: POST
    - path: {type: RegularExpression, value: "/re/[0-9]+"}
    - queryParams: [{name: tenant, value: a}]
      path: {value: /v2}
    backendRefs: [{name: reviews, port: 80}]
`

func TestMatchPrecedence(t *testing.T) {
	tbl, err := Compile(services(t), "shop", []*HTTPRoute{mustHTTP(t, matching)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		method, target string
		header         string
		want           string // backend, "404" or "-" (not attached)
	}{
		{"GET", "/", "", "reviews-v1"},
		{"GET", "/example", "", "reviews-v1"},
		{"GET", "/", "one", "reviews-v1"},
		{"GET", "/v2", "", "reviews-v2"},
		{"GET", "/v2/", "", "reviews-v2"},
		{"GET", "/v2/example", "", "reviews-v2"},
		{"GET", "/", "two", "reviews-v2"},
		{"GET", "/v2example", "", "reviews-v1"},
		{"GET", "/foo/v2/example", "", "reviews-v1"},
		{"POST", "/exact", "", "reviews"},
		{"GET", "/exact", "", "reviews-v1"},
		{"GET", "/re/12", "", "reviews-v1"}, // PathPrefix / outranks a regular expression
		{"GET", "/v2?tenant=a", "", "reviews"},
		{"GET", "/v2?tenant=b", "", "reviews-v2"},
	} {
		r := httptest.NewRequest(tc.method, tc.target, nil)
		if tc.header != "" {
			r.Header.Set("Version", tc.header)
		}
		got := result(tbl.Match("shop", "reviews", 80, r, r.URL.EscapedPath(), false))
		if got != tc.want {
			t.Errorf("%s %s (version %q) went to %s, want %s", tc.method, tc.target, tc.header, got, tc.want)
		}
	}
	if _, attached := tbl.Match("shop", "reviews", 7070, httptest.NewRequest("GET", "/", nil), "/", false); attached {
		t.Error("port 7070 has no route but is attached")
	}
}

func result(m Matched, attached bool) string {
	switch {
	case !attached:
		return "-"
	case m.Rule == nil:
		return "404"
	}
	b := m.Rule.Pick(func(int) int { return 0 })
	if b == nil {
		return "500"
	}
	return b.Name
}

// Which namespaces' routes a waypoint applies, as Istio's (listener_waypoint.go
// getVirtualServiceForWaypoint, buildWaypointInboundHTTPRouteConfig): those in the Service's
// namespace and those in the waypoint's own, to every caller, the waypoint's first; a route in a
// third namespace (a consumer route, GEP-1294) to nobody.
func TestRouteNamespaces(t *testing.T) {
	consumer := mustHTTP(t, `
metadata: {name: mine, namespace: frontend}
spec:
  parentRefs: [{kind: Service, name: reviews, namespace: shop}]
  rules:
  - backendRefs: [{name: reviews-v2, namespace: shop, port: 80}]
`)
	producer := mustHTTP(t, `
metadata: {name: theirs, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules:
  - matches: [{path: {type: Exact, value: /only}}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /shop}}]
    backendRefs: [{name: reviews-v1, port: 80}]
`)
	waypoints := mustHTTP(t, `
metadata: {name: ours, namespace: mesh}
spec:
  parentRefs: [{kind: Service, name: reviews, namespace: shop, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /mesh}}, {path: {type: PathPrefix, value: /shop/deeper}}]
    backendRefs: [{name: reviews-v2, namespace: shop, port: 80}]
`)
	all := []*HTTPRoute{consumer, producer, waypoints}
	for _, tc := range []struct {
		waypointNS string
		path       string
		port       uint16
		want       string // backend, "404" or "-" (not attached)
	}{
		// The waypoint in the Service's namespace: only shop's route applies, to every caller.
		{"shop", "/only", 80, "reviews-v1"},
		{"shop", "/other", 80, "404"}, // frontend's catch-all is not applied
		{"shop", "/mesh", 80, "404"},  // nor mesh's: a third namespace here
		{"shop", "/only", 7070, "reviews-v1"},
		// The waypoint in mesh: mesh's route first, then shop's; frontend's still not.
		{"mesh", "/mesh/x", 80, "reviews-v2"},
		{"mesh", "/shop/deeper", 80, "reviews-v2"}, // mesh's prefix before shop's shorter one
		{"mesh", "/shop/x", 80, "reviews-v1"},      // none of mesh's matches: shop's do
		{"mesh", "/only", 80, "reviews-v1"},
		{"mesh", "/other", 80, "404"},
		{"mesh", "/mesh", 7070, "404"}, // mesh's route is for port 80 only
		// The waypoint in frontend: frontend's route is the waypoint's namespace's.
		{"frontend", "/other", 80, "reviews-v2"},
		{"frontend", "/only", 7070, "reviews-v2"}, // before shop's Exact: the waypoint's first
	} {
		tbl, err := Compile(services(t), tc.waypointNS, all, nil)
		if err != nil {
			t.Fatal(err)
		}
		r := httptest.NewRequest("GET", tc.path, nil)
		if got := result(tbl.Match("shop", "reviews", tc.port, r, tc.path, false)); got != tc.want {
			t.Errorf("waypoint in %s: %s on port %d went to %s, want %s", tc.waypointNS, tc.path, tc.port, got, tc.want)
		}
	}
	tbl, err := Compile(services(t), "shop", all, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := "[HTTPRoute frontend/mine (parent Service shop/reviews) HTTPRoute mesh/ours (parent Service shop/reviews)]"
	if got := fmt.Sprint(tbl.OutOfScope()); got != want {
		t.Errorf("out of scope: %s\nwant %s", got, want)
	}
	tbl, err = Compile(services(t), "shop", []*HTTPRoute{consumer}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tbl.Attached("shop", "reviews", 80) {
		t.Error("a consumer route alone attached to the port, want no route (forwarded as before)")
	}
}

func TestWeightsAndInvalidBackends(t *testing.T) {
	tbl, err := Compile(services(t), "shop", []*HTTPRoute{mustHTTP(t, `
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {value: /split}}]
    backendRefs:
    - {name: reviews-v1, port: 80, weight: 70}
    - {name: reviews-v2, port: 80, weight: 30}
    - {name: gone, port: 80, weight: 0}
  - matches: [{path: {value: /none}}]
    backendRefs: [{name: reviews-v1, port: 80, weight: 0}]
  - matches: [{path: {value: /missing}}]
    backendRefs: [{name: nosuch, port: 80}]
`)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest("GET", "/split", nil)
	m, _ := tbl.Match("shop", "reviews", 80, r, "/split", false)
	counts := map[string]int{}
	for i := range 100 {
		counts[m.Rule.Pick(func(n int) int { return i % n }).Name]++
	}
	if counts["reviews-v1"] != 70 || counts["reviews-v2"] != 30 {
		t.Errorf("weights 70/30 over 100 draws gave %v", counts)
	}
	m, _ = tbl.Match("shop", "reviews", 80, r, "/none", false)
	if b := m.Rule.Pick(func(int) int { return 0 }); b != nil {
		t.Errorf("no weighted backend picked %v, want none (500)", b)
	}
	m, _ = tbl.Match("shop", "reviews", 80, r, "/missing", false)
	if b := m.Rule.Pick(func(int) int { return 0 }); b == nil || b.Invalid != "backend(nosuch.shop) not found" {
		t.Errorf("missing backend = %+v, want invalid", b)
	}
}

func TestCompileErrors(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{`{metadata: {name: a, namespace: shop}, spec: {rules: [{matches: [{path: {type: RegularExpression, value: "("}}]}]}}`,
			"httproute: HTTPRoute shop/a: rules[0]: matches[0]: path: regular expression \"(\": error parsing regexp: missing closing ): `^(?:()$`"},
		{`{metadata: {name: a, namespace: shop}, spec: {rules: [{filters: [{type: ExtensionRef, requestHeaderModifier: {}}]}]}}`,
			`httproute: HTTPRoute shop/a: rules[0]: filters[0]: filter type "ExtensionRef" is not supported here (detour implements RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, and for HTTPRoute RequestRedirect, URLRewrite and CORS)`},
		{`{metadata: {name: a, namespace: shop}, spec: {rules: [{matches: [{path: {type: Exact, value: /x}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]}]}}`,
			`httproute: HTTPRoute shop/a: rules[0]: matches[0]: ReplacePrefixMatch needs a PathPrefix match`},
		{`{metadata: {name: a, namespace: shop}, spec: {rules: [{timeouts: {request: 1s, backendRequest: 2s}}]}}`,
			`httproute: HTTPRoute shop/a: rules[0]: timeouts.backendRequest 2s is longer than timeouts.request 1s`},
	} {
		_, err := Compile(services(t), "shop", []*HTTPRoute{mustHTTP(t, tc.doc)}, nil)
		if err == nil || err.Error() != tc.want {
			t.Errorf("Compile(%s) = %v\nwant %s", tc.doc, err, tc.want)
		}
		// The refused route is named by kind, namespace and name (mesh reports it so).
		var re *RouteError
		if !errors.As(err, &re) || re.Kind != "HTTPRoute" || re.Namespace != "shop" || re.Name != "a" || !strings.HasPrefix(re.Err.Error(), "rules[0]: ") {
			t.Errorf("Compile(%s): %#v is no RouteError naming HTTPRoute shop/a", tc.doc, err)
		}
	}
}

func TestDecodeRefusesUnknownFields(t *testing.T) {
	_, err := DecodeHTTPRoute([]byte("metadata: {name: a, namespace: b}\nspec:\n  rules:\n  - sessionPersistence: {}\n"))
	if err == nil || !strings.Contains(err.Error(), `unknown field "sessionPersistence"`) {
		t.Errorf("err = %v, want unknown field sessionPersistence", err)
	}
}

func TestFilters(t *testing.T) {
	tbl, err := Compile(services(t), "shop", []*HTTPRoute{mustHTTP(t, `
metadata: {name: f, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {value: /strip-prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: mine, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {value: /prefix/one}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {value: /redirect}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
  - matches: [{path: {value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
  - matches: [{path: {value: /host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
  - matches: [{path: {value: /headers}}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: s}], add: [{name: x-add, value: a}], remove: [x-gone]}}]
`)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	do := func(target string) (*http.Request, Matched) {
		r := httptest.NewRequest("GET", "http://reviews"+target, nil)
		m, _ := tbl.Match("shop", "reviews", 80, r, r.URL.EscapedPath(), false)
		return r, m
	}
	for target, want := range map[string]string{
		"/strip-prefix/three": "/three", "/strip-prefix": "/", "/prefix/one/two": "/one/two", "/full/one/two": "/one",
	} {
		r, m := do(target)
		if got := m.Rule.Rewrite.Apply(r, r.URL.EscapedPath(), m.Prefix); got != want || r.URL.Path != want {
			t.Errorf("rewrite %s = %s (URL %s), want %s", target, got, r.URL.Path, want)
		}
	}
	for target, want := range map[string]string{
		"/redirect/a?q=1": "https://example.org/new/a?q=1", "/port": "http://reviews:8083/port", "/host": "http://example.org/host",
	} {
		r, m := do(target)
		if got := m.Rule.Redirect.Location(r, r.URL.EscapedPath(), m.Prefix, 80); got != want {
			t.Errorf("redirect %s = %s, want %s", target, got, want)
		}
	}
	r, m := do("/headers")
	r.Header.Set("X-Gone", "1")
	r.Header.Set("X-Add", "orig")
	m.Rule.RequestHeaders.Apply(r.Header)
	if got := r.Header; got.Get("X-Set") != "s" || strings.Join(got["X-Add"], ",") != "orig,a" || got.Get("X-Gone") != "" {
		t.Errorf("headers after the modifier: %v", got)
	}
}
