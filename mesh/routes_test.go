package mesh

import (
	"strings"
	"testing"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1alpha2 "sigs.k8s.io/gateway-api/apis/v1alpha2"

	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
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
	if err := convert(spec, &got); err == nil || !strings.Contains(err.Error(), `unknown field "sessionPersistence"`) {
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
	if err == nil || err.Error() != `mesh: a field detour does not implement: json: unknown field "useDefaultGateways"` {
		t.Errorf("a TCPRoute with useDefaultGateways: %v, want refused", err)
	}
}
