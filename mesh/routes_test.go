package mesh

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1alpha2 "sigs.k8s.io/gateway-api/apis/v1alpha2"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
)

// The gateway-api types convert into detour's field by field (the JSON names are the same), and
// a field detour does not implement refuses the route instead of being dropped.
func TestConvertRoutes(t *testing.T) {
	port := gwv1.PortNumber(80)
	weight := int32(30)
	group, kind := gwv1.Group(""), gwv1.Kind("Service")
	exact := gwv1.PathMatchExact
	timeout := gwv1.Duration("2s")
	spec := gwv1.HTTPRouteSpec{
		CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: &group, Kind: &kind, Name: "echo", Port: &port}}},
		Rules: []gwv1.HTTPRouteRule{{
			Matches:  []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: &exact, Value: new("/x")}, Headers: []gwv1.HTTPHeaderMatch{{Name: "version", Value: "two"}}}},
			Filters:  []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterRequestHeaderModifier, RequestHeaderModifier: &gwv1.HTTPHeaderFilter{Set: []gwv1.HTTPHeader{{Name: "a", Value: "b"}}}}},
			Timeouts: &gwv1.HTTPRouteTimeouts{Request: &timeout},
			BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{
				BackendObjectReference: gwv1.BackendObjectReference{Name: "echo-v2", Port: &port}, Weight: &weight}}},
		}},
	}
	var got httproute.HTTPRouteSpec
	if err := convert(spec, &got); err != nil {
		t.Fatal(err)
	}
	r := got.Rules[0]
	if got.ParentRefs[0].Name != "echo" || *got.ParentRefs[0].Port != 80 || *r.Matches[0].Path.Type != "Exact" ||
		r.Matches[0].Headers[0].Value != "two" || r.Filters[0].RequestHeaderModifier.Set[0].Value != "b" ||
		*r.Timeouts.Request != "2s" || r.BackendRefs[0].Name != "echo-v2" || *r.BackendRefs[0].Weight != 30 {
		t.Errorf("converted: %+v", got)
	}
	spec.Rules[0].SessionPersistence = &gwv1.SessionPersistence{SessionName: new("s")}
	if err := convert(spec, &got); err == nil || err.Error() != "mesh: spec.rules[0].sessionPersistence is not a field detour knows of HTTPRule" {
		t.Errorf("a route with sessionPersistence: %v, want refused", err)
	}
}

// TCPRoutes (v1) and TLSRoutes (v1 and v1alpha2) convert into proxy/l4route's types, and a
// field detour does not implement refuses the route.
func TestConvertL4Routes(t *testing.T) {
	port := gwv1.PortNumber(5432)
	weight := int32(3)
	parents := gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Name: "db", Port: &port}}}
	backends := []gwv1.BackendRef{{BackendObjectReference: gwv1.BackendObjectReference{Name: "db-v2", Port: &port}, Weight: &weight}}
	var tcp l4route.TCPRouteSpec
	if err := convert(gwv1.TCPRouteSpec{CommonRouteSpec: parents, Rules: []gwv1.TCPRouteRule{{BackendRefs: backends}}}, &tcp); err != nil {
		t.Fatal(err)
	}
	if tcp.ParentRefs[0].Name != "db" || *tcp.ParentRefs[0].Port != 5432 || tcp.Rules[0].BackendRefs[0].Name != "db-v2" || *tcp.Rules[0].BackendRefs[0].Weight != 3 {
		t.Errorf("TCPRoute converted: %+v", tcp)
	}
	for _, spec := range []any{
		gwv1.TLSRouteSpec{CommonRouteSpec: parents, Hostnames: []gwv1.Hostname{"*.example.com"}, Rules: []gwv1.TLSRouteRule{{BackendRefs: backends}}},
		gwv1alpha2.TLSRouteSpec{CommonRouteSpec: parents, Hostnames: []gwv1.Hostname{"*.example.com"}, Rules: []gwv1alpha2.TLSRouteRule{{BackendRefs: backends}}},
	} {
		var tls l4route.TLSRouteSpec
		if err := convert(spec, &tls); err != nil {
			t.Fatal(err)
		}
		if tls.Hostnames[0] != "*.example.com" || tls.Rules[0].BackendRefs[0].Port == nil || *tls.Rules[0].BackendRefs[0].Port != 5432 {
			t.Errorf("%T converted: %+v", spec, tls)
		}
	}
	parents.UseDefaultGateways = gwv1.GatewayDefaultScopeAll
	err := convert(gwv1.TCPRouteSpec{CommonRouteSpec: parents}, &tcp)
	if err == nil || err.Error() != "mesh: spec.useDefaultGateways is not a field detour knows of TCPRouteSpec" {
		t.Errorf("a TCPRoute with useDefaultGateways: %v, want refused", err)
	}
}

// Routes detour refuses (a field it does not implement, a value its compiler refuses) that name
// a bound service are reported as Unsupported with the route and the field; a refused route on
// an unbound service is warned of once (logRefused), a route detour applies not at all.
func TestRefusedRoutesReported(t *testing.T) {
	svc := func(name string, unbound bool, vip byte) *route.Service {
		return &route.Service{Namespace: "shop", Name: name, Hostname: name + ".shop.svc.cluster.local", Unbound: unbound,
			VIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, vip})}, Ports: []route.Port{{Name: "http", Port: 80}}}
	}
	table, err := route.NewTable([]*route.Service{svc("reviews", false, 1), svc("other", true, 2)})
	if err != nil {
		t.Fatal(err)
	}
	parent := func(name string) gwv1.CommonRouteSpec {
		return gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: new(gwv1.Group("")), Kind: new(gwv1.Kind("Service")), Name: gwv1.ObjectName(name)}}}
	}
	om := func(name string) metav1.ObjectMeta { return metav1.ObjectMeta{Namespace: "shop", Name: name} }
	backend := []gwv1.BackendRef{{BackendObjectReference: gwv1.BackendObjectReference{Name: "reviews", Port: new(gwv1.PortNumber(80))}}}
	l := listers{
		httpRoutes: func() ([]*gwv1.HTTPRoute, error) {
			return []*gwv1.HTTPRoute{
				{ObjectMeta: om("sticky"), Spec: gwv1.HTTPRouteSpec{CommonRouteSpec: parent("reviews"),
					Rules: []gwv1.HTTPRouteRule{{SessionPersistence: &gwv1.SessionPersistence{SessionName: new("s")}}}}},
				{ObjectMeta: om("fine"), Spec: gwv1.HTTPRouteSpec{CommonRouteSpec: parent("reviews"), Rules: []gwv1.HTTPRouteRule{{}}}},
				{ObjectMeta: om("other-sticky"), Spec: gwv1.HTTPRouteSpec{CommonRouteSpec: parent("other"),
					Rules: []gwv1.HTTPRouteRule{{SessionPersistence: &gwv1.SessionPersistence{SessionName: new("s")}}}}},
			}, nil
		},
		grpcRoutes: func() ([]*gwv1.GRPCRoute, error) { return nil, nil },
		tcpRoutes: func() ([]l4Object, error) {
			return []l4Object{{om("two-rules"), gwv1.TCPRouteSpec{CommonRouteSpec: parent("reviews"),
				Rules: []gwv1.TCPRouteRule{{BackendRefs: backend}, {BackendRefs: backend}}}}}, nil
		},
		tlsRoutes: func() ([]l4Object, error) { return nil, nil },
	}
	var buf bytes.Buffer
	d := &Discovery{Waypoint: authz.Waypoint{Namespace: "shop", Gateway: "detour"}, Logger: slog.New(slog.NewTextHandler(&buf, nil))}
	_, _, refused, err := d.compileRoutes(l, table)
	if err != nil {
		t.Fatal(err)
	}
	got, err := d.findUnsupported(unsupportedListers{routes: func() []refusedRoute { return refused }}, table)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, u := range got {
		lines = append(lines, u.Kind+" "+u.Namespace+"/"+u.Name+" ("+strings.Join(u.Services, ",")+"): "+u.Differs)
	}
	want := []string{
		"HTTPRoute shop/sticky (shop/reviews): " + routeDiffers + "spec.rules[0].sessionPersistence is not a field detour knows of HTTPRule",
		"TCPRoute shop/two-rules (shop/reviews): " + routeDiffers + "has 2 rules; a TCPRoute has exactly one (gateway.networking.k8s.io/v1), merge them into one rule's backendRefs",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Errorf("unsupported:\n%s\nwant\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
	// One warning per object over two snapshots: two for the reported, one for the unbound.
	for range 2 {
		d.reportUnsupported(got)
		d.logRefused(refused, got)
	}
	if n := strings.Count(buf.String(), "level=WARN"); n != 3 || !strings.Contains(buf.String(), "HTTPRoute shop/other-sticky not applied: spec.rules[0].sessionPersistence") {
		t.Errorf("%d warnings:\n%s", n, buf.String())
	}
}

// Any HTTPRoute spec the gateway-api types decode converts or is refused with a reason; the
// conversion (and unknownField's path search on refusal) never panics.
func FuzzConvertHTTPRoute(f *testing.F) {
	f.Add([]byte(`{"parentRefs":[{"name":"reviews"}],"rules":[{"sessionPersistence":{"sessionName":"s"}}]}`))
	f.Add([]byte(`{"rules":[{"filters":[{"type":"ExtensionRef","extensionRef":{"group":"x","kind":"Y","name":"z"}}]}]}`))
	f.Add([]byte(`{"rules":[{"backendRefs":[{"name":"v1","port":80,"weight":3}]}]}`))
	f.Fuzz(func(t *testing.T, doc []byte) {
		var spec gwv1.HTTPRouteSpec
		if json.Unmarshal(doc, &spec) != nil {
			return
		}
		var into httproute.HTTPRouteSpec
		if err := convert(spec, &into); err != nil && err.Error() == "" {
			t.Fatal("refused without a reason")
		}
	})
}
