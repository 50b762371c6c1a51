package mesh

import (
	"strings"
	"testing"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// A Gateway's HBONE listener admits only its own namespace's services unless its allowedRoutes
// say otherwise (Istio's makeAllowedRoutes); any other listener does not count.
func TestAdmitsOthers(t *testing.T) {
	from := func(f gwv1.FromNamespaces) *gwv1.AllowedRoutes {
		return &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &f}}
	}
	hbone := func(a *gwv1.AllowedRoutes) gwv1.Listener {
		return gwv1.Listener{Name: "mesh", Port: 15008, Protocol: "HBONE", AllowedRoutes: a}
	}
	for _, tc := range []struct {
		name      string
		listeners []gwv1.Listener
		want      string // a part of the report; "" none
	}{
		{"as installed", []gwv1.Listener{hbone(nil)}, ""},
		{"Same", []gwv1.Listener{hbone(from(gwv1.NamespacesFromSame))}, ""},
		{"no namespaces", []gwv1.Listener{hbone(&gwv1.AllowedRoutes{})}, ""},
		{"All", []gwv1.Listener{hbone(from(gwv1.NamespacesFromAll))}, "(allowedRoutes.namespaces.from: All)"},
		{"Selector", []gwv1.Listener{hbone(from(gwv1.NamespacesFromSelector))}, "(allowedRoutes.namespaces.from: Selector)"},
		{"another listener", []gwv1.Listener{{Name: "x", Port: 80, Protocol: "HTTP", AllowedRoutes: from(gwv1.NamespacesFromAll)}, hbone(nil)}, ""},
	} {
		got := admitsOthers(&gwv1.Gateway{Spec: gwv1.GatewaySpec{Listeners: tc.listeners}}, "shop")
		if tc.want == "" && got != "" || tc.want != "" && (!strings.Contains(got, tc.want) || !strings.Contains(got, "discovers namespace shop only")) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}
