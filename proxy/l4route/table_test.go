package l4route

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/route"
)

func services(t testing.TB) *route.Table {
	t.Helper()
	var svcs []*route.Service
	for i, name := range []string{"db", "db-v1", "db-v2", "db-v3"} {
		svcs = append(svcs, &route.Service{Name: name, Namespace: "shop", Hostname: name + ".shop.svc.cluster.local",
			VIPs:  []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, byte(i + 1)})},
			Ports: []route.Port{{Name: "tcp", Port: 5432, TargetPort: 5432}, {Name: "tls", Port: 443, TargetPort: 8443}}})
	}
	tbl, err := route.NewTable(svcs)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

func compile(t *testing.T, docs ...string) (*Table, error) {
	t.Helper()
	return compileFor(t, "shop", docs...)
}

// compileFor compiles docs (each created a second after the one before) for a waypoint in
// waypointNS.
func compileFor(t *testing.T, waypointNS string, docs ...string) (*Table, error) {
	t.Helper()
	var tcps []*TCPRoute
	var tlss []*TLSRoute
	for i, doc := range docs {
		if strings.Contains(doc, "kind: TLSRoute") {
			r, err := DecodeTLSRoute([]byte(doc))
			if err != nil {
				t.Fatal(err)
			}
			r.Metadata.CreationTimestamp = time.Unix(int64(i), 0)
			tlss = append(tlss, r)
			continue
		}
		r, err := DecodeTCPRoute([]byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		r.Metadata.CreationTimestamp = time.Unix(int64(i), 0)
		tcps = append(tcps, r)
	}
	return Compile(services(t), waypointNS, tcps, tlss)
}

const (
	tcpRoute = `
kind: TCPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{name: db, port: 5432}]
  rules: [{backendRefs: [{name: db-v1, port: 5432, weight: 3}, {name: db-v2, port: 5432, weight: 1}]}]
`
	tlsExact = `
kind: TLSRoute
metadata: {name: exact, namespace: shop}
spec:
  parentRefs: [{name: db, sectionName: tls}]
  hostnames: [api.example.com]
  rules: [{backendRefs: [{name: db-v1, port: 443}]}]
`
	tlsWild = `
kind: TLSRoute
metadata: {name: wild, namespace: shop}
spec:
  parentRefs: [{name: db}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: db-v2, port: 443}]}]
`
	tlsWilder = `
kind: TLSRoute
metadata: {name: wilder, namespace: shop}
spec:
  parentRefs: [{name: db}]
  hostnames: ["*.eu.example.com"]
  rules: [{backendRefs: [{name: db-v3, port: 443}]}]
`
)

func backendOf(r *Rule) string {
	if r == nil {
		return "refused"
	}
	return r.Backends[0].Name
}

// SNI precedence as the spec's hostnames: exact, then the longest wildcard (a suffix match of
// one label or more, never the bare domain), then the port's TCPRoute, else refused.
func TestMatchSNI(t *testing.T) {
	// wilder is newest: precedence comes from the hostname, not the age.
	tbl, err := compile(t, tlsWild, tlsExact, tlsWilder, `
kind: TCPRoute
metadata: {name: rest, namespace: shop}
spec:
  parentRefs: [{name: db, port: 443}]
  rules: [{backendRefs: [{name: db, port: 443}]}]
`)
	if err != nil {
		t.Fatal(err)
	}
	rs := tbl.For("shop", "db", 443)
	if !rs.NeedsSNI() {
		t.Fatal("a port with a TLSRoute needs the SNI")
	}
	for _, tc := range []struct {
		tls  bool
		sni  string
		want string
	}{
		{true, "api.example.com", "db-v1"},
		{true, "API.Example.com.", "db-v1"}, // SNI is case-insensitive, a trailing dot is the same name
		{true, "web.example.com", "db-v2"},
		{true, "a.b.example.com", "db-v2"},
		{true, "x.eu.example.com", "db-v3"},
		{true, "eu.example.com", "db-v2"},
		{true, "example.com", "db"}, // no wildcard takes the bare domain: the TCPRoute
		{true, "", "db"},
		{false, "api.example.com", "db"}, // not TLS: only the TCPRoute
	} {
		if got := backendOf(rs.Match(tc.tls, tc.sni)); got != tc.want {
			t.Errorf("Match(tls %v, %q) = %s, want %s", tc.tls, tc.sni, got, tc.want)
		}
	}
	// Without a TCPRoute, a stream no TLSRoute takes is refused; TLSRoute hostnames do not
	// attach to the TCP port the exact route's sectionName left out.
	tbl, err = compile(t, tlsExact, tlsWild)
	if err != nil {
		t.Fatal(err)
	}
	rs = tbl.For("shop", "db", 443)
	for sni, want := range map[string]string{"api.example.com": "db-v1", "other.org": "refused", "": "refused"} {
		if got := backendOf(rs.Match(true, sni)); got != want {
			t.Errorf("Match(%q) = %s, want %s", sni, got, want)
		}
	}
	if got := backendOf(tbl.For("shop", "db", 5432).Match(true, "api.example.com")); got != "db-v2" {
		t.Errorf("port 5432 = %s, want the wildcard route's db-v2 (it has no port)", got)
	}
	if tbl.For("shop", "db-v1", 443) != nil || tbl.For("shop", "db", 80) != nil {
		t.Error("routes attached where no parentRef names them")
	}
}

// Weights are drawn per connection, an invalid or weightless backend refusing its share.
func TestPickWeights(t *testing.T) {
	tbl, err := compile(t, tcpRoute, `
kind: TCPRoute
metadata: {name: broken, namespace: shop}
spec:
  parentRefs: [{name: db-v1, port: 5432}]
  rules: [{backendRefs: [{name: nosuch, port: 5432}, {name: db-v2, port: 5433}, {name: db.shop.svc, port: 5432}, {name: db-v3, port: 5432, weight: 0}]}]
`, `
kind: TCPRoute
metadata: {name: none, namespace: shop}
spec:
  parentRefs: [{name: db-v2, port: 5432}]
  rules: [{}]
`)
	if err != nil {
		t.Fatal(err)
	}
	rule := tbl.For("shop", "db", 5432).Match(false, "")
	counts := map[string]int{}
	for n := range 4 {
		counts[rule.Pick(func(int) int { return n }).Name]++
	}
	if counts["db-v1"] != 3 || counts["db-v2"] != 1 {
		t.Errorf("draws 0..3 over weights 3:1 = %v, want db-v1 3, db-v2 1", counts)
	}
	broken := tbl.For("shop", "db-v1", 5432).Match(false, "")
	var invalid []string
	for n := range 3 {
		invalid = append(invalid, broken.Pick(func(int) int { return n }).Invalid)
	}
	want := []string{"backend(nosuch.shop) not found", "backend(db-v2.shop) has no port 5433",
		"service name invalid; the name of the Service must be used, not the hostname"}
	if strings.Join(invalid, "|") != strings.Join(want, "|") {
		t.Errorf("invalid backends:\n%q\nwant\n%q", invalid, want)
	}
	if b := tbl.For("shop", "db-v2", 5432).Match(false, "").Pick(func(int) int { return 0 }); b != nil {
		t.Errorf("a rule without backends picked %+v, want none (refused)", b)
	}
}

// The oldest of several TCPRoutes of the Service's namespace wins, for every caller.
func TestConflicts(t *testing.T) {
	tbl, err := compile(t, tcpRoute, `
kind: TCPRoute
metadata: {name: newer, namespace: shop}
spec:
  parentRefs: [{name: db}]
  rules: [{backendRefs: [{name: db-v3, port: 5432}]}]
`)
	if err != nil {
		t.Fatal(err)
	}
	one := func(int) int { return 0 }
	if got := tbl.For("shop", "db", 5432).Match(false, "").Pick(one).Name; got != "db-v1" {
		t.Errorf("port 5432: %s, want the older route's db-v1", got)
	}
	if got := tbl.For("shop", "db", 443).Match(false, "").Pick(one).Name; got != "db-v3" {
		t.Errorf("port 443: %s, want the only route there, newer's db-v3", got)
	}
}

// Which namespaces' routes a waypoint applies, as Istio's (listener_waypoint.go
// getVirtualServiceForWaypoint, getWaypointTCPRoutes): those in the Service's namespace and
// those in the waypoint's own, to every caller, the waypoint's first (TLS before TCP across
// both); a route in a third namespace (a consumer route) to nobody.
func TestRouteNamespaces(t *testing.T) {
	consumer := `
kind: TCPRoute
metadata: {name: mine, namespace: tenant}
spec:
  parentRefs: [{name: db, namespace: shop, port: 5432}]
  rules: [{backendRefs: [{name: db-v3, namespace: shop, port: 5432}]}]
`
	waypoints := `
kind: TCPRoute
metadata: {name: ours, namespace: mesh}
spec:
  parentRefs: [{name: db, namespace: shop, port: 5432}]
  rules: [{backendRefs: [{name: db-v2, namespace: shop, port: 5432}]}]
`
	waypointsTLS := `
kind: TLSRoute
metadata: {name: ours-tls, namespace: mesh}
spec:
  parentRefs: [{name: db, namespace: shop}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: db-v3, namespace: shop, port: 443}]}]
`
	one := func(int) int { return 0 }
	pick := func(rs *Routes, tls bool, sni string) string {
		if rs == nil {
			return "-"
		}
		return backendOf(rs.Match(tls, sni))
	}
	// The waypoint in mesh: shop's routes and mesh's apply, mesh's first although newest (and
	// its wildcard before shop's exact hostname); tenant's does not.
	tbl, err := compileFor(t, "mesh", tcpRoute, tlsExact, consumer, waypoints, waypointsTLS)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		port uint16
		tls  bool
		sni  string
		want string
	}{
		{5432, false, "", "db-v2"},               // mesh/ours before shop/split
		{443, true, "api.example.com", "db-v3"},  // mesh/ours-tls before shop/exact
		{443, true, "other.org", "refused"},      // no TLSRoute matches, no TCPRoute on 443
		{5432, true, "api.example.com", "db-v3"}, // TLS before TCP, across namespaces
	} {
		if got := pick(tbl.For("shop", "db", tc.port), tc.tls, tc.sni); got != tc.want {
			t.Errorf("waypoint in mesh, port %d tls %v %q: %s, want %s", tc.port, tc.tls, tc.sni, got, tc.want)
		}
	}
	want := "TCPRoute tenant/mine (parent Service shop/db)"
	if got := fmt.Sprint(tbl.OutOfScope()); got != "["+want+"]" {
		t.Errorf("out of scope: %s, want [%s]", got, want)
	}
	// The waypoint in shop, the Service's namespace: mesh's routes are a third namespace's too.
	tbl, err = compileFor(t, "shop", tcpRoute, tlsExact, consumer, waypoints, waypointsTLS)
	if err != nil {
		t.Fatal(err)
	}
	if got := tbl.For("shop", "db", 5432).Match(false, "").Pick(one).Name; got != "db-v1" {
		t.Errorf("waypoint in shop, port 5432: %s, want shop/split's db-v1", got)
	}
	if got := pick(tbl.For("shop", "db", 443), true, "api.example.com"); got != "db-v1" {
		t.Errorf("waypoint in shop, api.example.com: %s, want shop/exact's db-v1", got)
	}
	want = "[TCPRoute tenant/mine (parent Service shop/db) TCPRoute mesh/ours (parent Service shop/db) TLSRoute mesh/ours-tls (parent Service shop/db)]"
	if got := fmt.Sprint(tbl.OutOfScope()); got != want {
		t.Errorf("out of scope: %s\nwant %s", got, want)
	}
	// Only third namespaces' routes: the port is not routed at all.
	tbl, err = compileFor(t, "shop", consumer)
	if err != nil {
		t.Fatal(err)
	}
	if rs := tbl.For("shop", "db", 5432); rs != nil {
		t.Errorf("a consumer route alone: routes %+v, want none", rs)
	}
}

func TestCompileErrors(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{`{kind: TCPRoute, metadata: {name: two, namespace: shop}, spec: {parentRefs: [{name: db}], rules: [{}, {}]}}`,
			"l4route: TCPRoute shop/two: has 2 rules; a TCPRoute has exactly one (gateway.networking.k8s.io/v1), merge them into one rule's backendRefs"},
		{`{kind: TCPRoute, metadata: {name: w, namespace: shop}, spec: {rules: [{backendRefs: [{name: db, port: 1, weight: -1}]}]}}`,
			"l4route: TCPRoute shop/w: rules[0]: backendRefs[0]: weight -1 is outside 0..1000000"},
		{`{kind: TLSRoute, metadata: {name: h, namespace: shop}, spec: {hostnames: ["*example.com"], rules: [{}]}}`,
			`l4route: TLSRoute shop/h: hostnames[0]: "*example.com" is not a hostname (lower-case RFC 1123 labels, optionally a first label *.; no IP)`},
		{`{kind: TLSRoute, metadata: {name: h, namespace: shop}, spec: {hostnames: ["10.0.0.1"], rules: [{}]}}`,
			`l4route: TLSRoute shop/h: hostnames[0]: "10.0.0.1" is not a hostname (lower-case RFC 1123 labels, optionally a first label *.; no IP)`},
		{`{kind: TCPRoute, metadata: {name: x}, spec: {rules: [{}]}}`,
			"l4route: a TCPRoute needs metadata.name and metadata.namespace"},
	} {
		_, err := compile(t, tc.doc)
		if err == nil || err.Error() != tc.want {
			t.Errorf("Compile(%s) = %v\nwant %s", tc.doc, err, tc.want)
		}
		// A refused route is named by kind, namespace and name (mesh reports it so).
		var re *httproute.RouteError
		if named := errors.As(err, &re); named != strings.Contains(tc.doc, "namespace: shop") {
			t.Errorf("Compile(%s): %#v: RouteError %v", tc.doc, err, named)
		}
	}
	// One bad route is left out; the others apply.
	tbl, err := compile(t, tcpRoute, `{kind: TCPRoute, metadata: {name: two, namespace: shop}, spec: {parentRefs: [{name: db-v1}], rules: [{}, {}]}}`)
	if err == nil || tbl.For("shop", "db", 5432) == nil || tbl.For("shop", "db-v1", 5432) != nil {
		t.Errorf("a bad route beside a good one: err %v, good attached %v", err, tbl.For("shop", "db", 5432) != nil)
	}
}

func TestDecodeStrict(t *testing.T) {
	for _, tc := range []struct {
		doc  string
		tls  bool
		want string
	}{
		{"metadata: {name: a, namespace: b}\nspec:\n  rules:\n  - backendRefs: [{name: x, port: 1, filters: []}]\n", false,
			"line 4: r.spec.rules[0].backendRefs[0].filters is not a field detour knows of BackendRef"},
		{"metadata: {name: a, namespace: b}\nspec:\n  hostnames: [a.b]\n  useDefaultGateways: All\n", true,
			"line 4: r.spec.useDefaultGateways is not a field detour knows of TLSRouteSpec"},
		{"metadata: {name: a, namespace: b}\nspec:\n  hostnames: [a.b]\n", false,
			"line 3: r.spec.hostnames is not a field detour knows of TCPRouteSpec"},
	} {
		var n yaml.Node
		if err := yaml.Unmarshal([]byte(tc.doc), &n); err != nil {
			t.Fatal(err)
		}
		if err := CheckYAML(n.Content[0], tc.tls, "r"); err == nil || err.Error() != tc.want {
			t.Errorf("CheckYAML = %v\nwant %s", err, tc.want)
		}
	}
	if _, err := DecodeTCPRoute([]byte("spec: {hostnames: [a]}")); err == nil || err.Error() != `l4route: TCPRoute: json: unknown field "hostnames"` {
		t.Errorf("DecodeTCPRoute = %v", err)
	}
}
