package mesh

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
	extensionsapi "istio.io/api/extensions/v1alpha1"
	networkingapi "istio.io/api/networking/v1alpha3"
	telemetryapi "istio.io/api/telemetry/v1alpha1"
	typev1beta1 "istio.io/api/type/v1beta1"
	extensionsv1alpha1 "istio.io/client-go/pkg/apis/extensions/v1alpha1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	networkingv1alpha3 "istio.io/client-go/pkg/apis/networking/v1alpha3"
	telemetryv1 "istio.io/client-go/pkg/apis/telemetry/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

// Which Istio objects would apply to services bound to waypoint detour in namespace mesh (root
// namespace istio-system): bound shop/reviews and mesh/ratings, unbound shop/other.
func TestFindUnsupported(t *testing.T) {
	svc := func(ns, name string, unbound bool, vip byte) *route.Service {
		return &route.Service{Namespace: ns, Name: name, Hostname: name + "." + ns + ".svc.cluster.local", Unbound: unbound,
			VIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, vip})}}
	}
	table, err := route.NewTable([]*route.Service{svc("shop", "reviews", false, 1), svc("mesh", "ratings", false, 2), svc("shop", "other", true, 3),
		{Namespace: "mesh", Name: "detour", Hostname: "detour.mesh.svc.cluster.local", Self: true}})
	if err != nil {
		t.Fatal(err)
	}
	om := func(ns, name string) metav1.ObjectMeta { return metav1.ObjectMeta{Namespace: ns, Name: name} }
	vs := func(ns, name string, hosts, gateways, exportTo []string) *networkingv1.VirtualService {
		return &networkingv1.VirtualService{ObjectMeta: om(ns, name), Spec: networkingapi.VirtualService{Hosts: hosts, Gateways: gateways, ExportTo: exportTo}}
	}
	dr := func(ns, name, host string, exportTo ...string) *networkingv1.DestinationRule {
		return &networkingv1.DestinationRule{ObjectMeta: om(ns, name), Spec: networkingapi.DestinationRule{Host: host, ExportTo: exportTo}}
	}
	ref := func(group, kind, name string) []*typev1beta1.PolicyTargetReference {
		return []*typev1beta1.PolicyTargetReference{{Group: group, Kind: kind, Name: name}}
	}
	ef := func(ns, name string, sel map[string]string, refs []*typev1beta1.PolicyTargetReference) *networkingv1alpha3.EnvoyFilter {
		f := &networkingv1alpha3.EnvoyFilter{ObjectMeta: om(ns, name), Spec: networkingapi.EnvoyFilter{TargetRefs: refs}}
		if sel != nil {
			f.Spec.WorkloadSelector = &networkingapi.WorkloadSelector{Labels: sel}
		}
		return f
	}
	wp := func(ns, name string, refs []*typev1beta1.PolicyTargetReference) *extensionsv1alpha1.WasmPlugin {
		return &extensionsv1alpha1.WasmPlugin{ObjectMeta: om(ns, name), Spec: extensionsapi.WasmPlugin{Url: "oci://x", TargetRefs: refs}}
	}
	u := unsupportedListers{
		virtualServices: func() ([]*networkingv1.VirtualService, error) {
			return []*networkingv1.VirtualService{
				vs("shop", "short", []string{"reviews"}, nil, nil),
				// not in ratings' namespace nor the waypoint's
				vs("shop", "fqdn-mesh", []string{"ratings.mesh.svc.cluster.local"}, []string{"mesh"}, nil),
				vs("mesh", "wild", []string{"*.svc.cluster.local"}, nil, nil), // both bound, not other
				vs("shop", "ingress", []string{"reviews"}, []string{"istio-system/ingress"}, nil),
				vs("shop", "private", []string{"reviews"}, nil, []string{"."}), // not exported to mesh
				vs("shop", "unbound", []string{"other"}, nil, nil),
			}, nil
		},
		destinationRules: func() ([]*networkingv1.DestinationRule, error) {
			return []*networkingv1.DestinationRule{
				dr("shop", "reviews", "reviews"), dr("istio-system", "root", "*.shop.svc.cluster.local"),
				dr("elsewhere", "far", "reviews.shop.svc.cluster.local"), dr("mesh", "local", "ratings", "."),
			}, nil
		},
		envoyFilters: func() ([]*networkingv1alpha3.EnvoyFilter, error) {
			return []*networkingv1alpha3.EnvoyFilter{
				ef("istio-system", "mesh-wide", nil, nil), ef("shop", "shop-wide", nil, nil),
				ef("mesh", "selects-waypoint", map[string]string{"gateway.networking.k8s.io/gateway-name": "detour"}, nil),
				ef("mesh", "selects-app", map[string]string{"app": "ratings"}, nil),
				ef("mesh", "targets-gateway", nil, ref("gateway.networking.k8s.io", "Gateway", "detour")),
			}, nil
		},
		wasmPlugins: func() ([]*extensionsv1alpha1.WasmPlugin, error) {
			return []*extensionsv1alpha1.WasmPlugin{
				wp("shop", "reviews-plugin", ref("", "Service", "reviews")), wp("shop", "other-plugin", ref("", "Service", "other")),
				wp("istio-system", "class", ref("gateway.networking.k8s.io", "GatewayClass", "istio-waypoint")),
			}, nil
		},
		extensions: func() ([]*extensionsv1alpha1.TrafficExtension, error) {
			return []*extensionsv1alpha1.TrafficExtension{
				{ObjectMeta: om("mesh", "lua"), Spec: extensionsapi.TrafficExtension{TargetRefs: ref("", "Service", "ratings")}},
				{ObjectMeta: om("mesh", "elsewhere"), Spec: extensionsapi.TrafficExtension{Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "x"}}}},
			}, nil
		},
	}
	d := &Discovery{Waypoint: authz.Waypoint{Namespace: "mesh", Gateway: "detour", RootNamespace: "istio-system"}}
	got, err := d.findUnsupported(u, table)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, o := range got {
		lines = append(lines, o.Kind+" "+o.Namespace+"/"+o.Name+": "+strings.Join(o.Services, ","))
	}
	want := []string{
		"DestinationRule istio-system/root: shop/reviews",
		"DestinationRule mesh/local: mesh/ratings",
		"DestinationRule shop/reviews: shop/reviews",
		"EnvoyFilter istio-system/mesh-wide: mesh/ratings,shop/reviews",
		"EnvoyFilter mesh/selects-waypoint: mesh/ratings,shop/reviews",
		"EnvoyFilter mesh/targets-gateway: mesh/ratings,shop/reviews",
		"TrafficExtension mesh/lua: mesh/ratings",
		"VirtualService mesh/wild: mesh/ratings,shop/reviews",
		"VirtualService shop/short: shop/reviews",
		"WasmPlugin istio-system/class: mesh/ratings,shop/reviews",
		"WasmPlugin shop/reviews-plugin: shop/reviews",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Errorf("unsupported:\n%s\nwant\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}

	// One warning per object: a rebuild with the same objects logs nothing; a change in the
	// services an object applies to logs it again. The callback gets every snapshot.
	var buf bytes.Buffer
	var calls int
	d.Logger = slog.New(slog.NewTextHandler(&buf, nil))
	d.UnsupportedConfig = func([]Unsupported) { calls++ }
	d.reportUnsupported(got)
	d.reportUnsupported(got)
	if n := strings.Count(buf.String(), "level=WARN"); n != len(want) {
		t.Errorf("%d warnings for %d objects over two snapshots:\n%s", n, len(want), buf.String())
	}
	buf.Reset()
	got[0].Services = []string{"shop/reviews", "shop/more"}
	d.reportUnsupported(got)
	if n := strings.Count(buf.String(), "level=WARN"); n != 1 || !strings.Contains(buf.String(), "DestinationRule istio-system/root applies to services bound to this waypoint") {
		t.Errorf("after one object changed: %s", buf.String())
	}
	if calls != 3 || len(d.UnsupportedObjects()) != len(want) {
		t.Errorf("callback called %d times, objects %d", calls, len(d.UnsupportedObjects()))
	}
}

// Telemetry beyond the defaults (telemetryDiffers) that would apply to the waypoint is
// reported with what is not done; one with only the defaults, or not applying, is not.
func TestFindUnsupportedTelemetry(t *testing.T) {
	table, err := route.NewTable([]*route.Service{{Namespace: "mesh", Name: "ratings", Hostname: "ratings.mesh.svc.cluster.local",
		VIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, 2})}}})
	if err != nil {
		t.Fatal(err)
	}
	tel := func(ns, name string, spec *telemetryapi.Telemetry) *telemetryv1.Telemetry {
		o := &telemetryv1.Telemetry{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
		proto.Merge(&o.Spec, spec)
		return o
	}
	prom := []*telemetryapi.ProviderRef{{Name: "prometheus"}}
	u := unsupportedListers{telemetries: func() ([]*telemetryv1.Telemetry, error) {
		return []*telemetryv1.Telemetry{
			tel("istio-system", "mesh-default", &telemetryapi.Telemetry{Metrics: []*telemetryapi.Metrics{{Providers: prom}}}),
			tel("istio-system", "mesh-tracing", &telemetryapi.Telemetry{Tracing: []*telemetryapi.Tracing{{RandomSamplingPercentage: wrapperspb.Double(10)}}}),
			tel("mesh", "no-spans", &telemetryapi.Telemetry{Tracing: []*telemetryapi.Tracing{{DisableSpanReporting: wrapperspb.Bool(true)}}}),
			tel("mesh", "logs", &telemetryapi.Telemetry{AccessLogging: []*telemetryapi.AccessLogging{{Providers: []*telemetryapi.ProviderRef{{Name: "otel"}}}}}),
			tel("mesh", "no-logs", &telemetryapi.Telemetry{AccessLogging: []*telemetryapi.AccessLogging{{Disabled: wrapperspb.Bool(true)}}}),
			tel("mesh", "overrides", &telemetryapi.Telemetry{
				TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "ratings"}},
				Metrics:    []*telemetryapi.Metrics{{Providers: prom, Overrides: []*telemetryapi.MetricsOverrides{{Disabled: wrapperspb.Bool(true)}}}}}),
			tel("mesh", "other-app", &telemetryapi.Telemetry{Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "x"}},
				Tracing: []*telemetryapi.Tracing{{}}}),
			tel("elsewhere", "ns-wide", &telemetryapi.Telemetry{Tracing: []*telemetryapi.Tracing{{}}}),
		}, nil
	}}
	d := &Discovery{Waypoint: authz.Waypoint{Namespace: "mesh", Gateway: "detour", RootNamespace: "istio-system"}}
	got, err := d.findUnsupported(u, table)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, o := range got {
		lines = append(lines, o.Kind+" "+o.Namespace+"/"+o.Name+": "+o.Differs)
	}
	want := []string{
		"Telemetry istio-system/mesh-tracing: tracing (the mesh's default provider) is not done (detour reports no spans)",
		"Telemetry mesh/logs: access logging (otel) is not done (detour writes its own access log)",
		"Telemetry mesh/overrides: metrics overrides not applied (detour exports Istio's standard metrics to Prometheus, labels unchanged)",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Errorf("unsupported:\n%s\nwant\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
}
