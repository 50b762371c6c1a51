package mesh

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/wrapperspb"
	networkingapi "istio.io/api/networking/v1alpha3"
	telemetryapi "istio.io/api/telemetry/v1alpha1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	telemetryv1 "istio.io/client-go/pkg/apis/telemetry/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
)

// A VirtualService and a DestinationRule for a bound service, created on the real API server,
// a mesh-wide Telemetry with tracing in the root namespace and an HTTPRoute detour refuses are
// reported (UnsupportedObjects and the detour_unsupported_config gauge, wired as the waypoint
// wires it, for a waypoint discovering its own namespace as installed); one for an unbound
// service is not, and a deleted one leaves the report and the gauge (issue 17, acceptance 4).
func TestDiscoveryUnsupported(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "unsupported"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	for name, waypoint := range map[string]string{"reviews": "detour", "other": "none"} {
		if _, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{mesh.UseWaypoint: waypoint}},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	for name, host := range map[string]string{"reviews": "reviews", "other": "other"} {
		vs := &networkingv1.VirtualService{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: networkingapi.VirtualService{Hosts: []string{host}, Http: []*networkingapi.HTTPRoute{{
				Route: []*networkingapi.HTTPRouteDestination{{Destination: &networkingapi.Destination{Host: host}}}}}}}
		if _, err := ic.NetworkingV1().VirtualServices(ns).Create(ctx, vs, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ic.NetworkingV1().DestinationRules(ns).Create(ctx, &networkingv1.DestinationRule{ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: ns},
		Spec: networkingapi.DestinationRule{Host: "reviews.unsupported.svc.cluster.local"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Mesh-wide Telemetry with tracing in the root namespace (beyond the defaults), seen by a
	// waypoint that discovers its own namespace only (as installed: kubernetes.namespace).
	tel := &telemetryv1.Telemetry{ObjectMeta: metav1.ObjectMeta{Name: "mesh-tracing", Namespace: "istio-system"},
		Spec: telemetryapi.Telemetry{Tracing: []*telemetryapi.Tracing{{RandomSamplingPercentage: wrapperspb.Double(1)}}}}
	if _, err := ic.TelemetryV1().Telemetries("istio-system").Create(ctx, tel, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = ic.TelemetryV1().Telemetries("istio-system").Delete(context.Background(), "mesh-tracing", metav1.DeleteOptions{})
	})
	// An HTTPRoute on reviews with a filter detour does not handle (ExtensionRef): refused.
	gc, err := gwclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gc.GatewayV1().HTTPRoutes(ns).Create(ctx, &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: "ext", Namespace: ns},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr(gwv1.Group("")), Kind: ptr(gwv1.Kind("Service")), Name: "reviews"}}},
			Rules: []gwv1.HTTPRouteRule{{Filters: []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterExtensionRef,
				ExtensionRef: &gwv1.LocalObjectReference{Group: "example.com", Kind: "Thing", Name: "x"}}}}},
		}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The gauge as the waypoint command wires it (cmd/detour/cli waypoint.go).
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	d := &mesh.Discovery{Kube: c.Client, Istio: ic, Gateway: gc, Namespace: ns, Waypoint: authz.Waypoint{Namespace: ns, Gateway: "detour"}}
	d.UnsupportedConfig = func(list []mesh.Unsupported) {
		objs := make([]metrics.Config, 0, len(list))
		for _, u := range list {
			objs = append(objs, metrics.Config{Kind: u.Kind, Namespace: u.Namespace, Name: u.Name})
		}
		m.SetUnsupported(objs)
	}
	runDiscovery(ctx, t, d)
	gauge := func() string {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, mf := range mfs {
			if mf.GetName() != "detour_unsupported_config" {
				continue
			}
			for _, mt := range mf.GetMetric() {
				l := map[string]string{}
				for _, lp := range mt.GetLabel() {
					l[lp.GetName()] = lp.GetValue()
				}
				lines = append(lines, fmt.Sprintf("%s %s/%s=%g", l["kind"], l["namespace"], l["name"], mt.GetGauge().GetValue()))
			}
		}
		slices.Sort(lines)
		return strings.Join(lines, "; ")
	}
	if got, want := gauge(), "DestinationRule unsupported/reviews=1; HTTPRoute unsupported/ext=1; Telemetry istio-system/mesh-tracing=1; VirtualService unsupported/reviews=1"; got != want {
		t.Fatalf("detour_unsupported_config: %q, want %q", got, want)
	}
	report := func() string {
		var lines []string
		for _, u := range d.UnsupportedObjects() {
			lines = append(lines, u.Kind+" "+u.Namespace+"/"+u.Name+": "+strings.Join(u.Services, ","))
		}
		return strings.Join(lines, "; ")
	}
	want := "DestinationRule unsupported/reviews: unsupported/reviews; HTTPRoute unsupported/ext: unsupported/reviews; Telemetry istio-system/mesh-tracing: unsupported/reviews; VirtualService unsupported/reviews: unsupported/reviews"
	if got := report(); got != want {
		t.Fatalf("reported %q, want %q", got, want)
	}
	if err := ic.NetworkingV1().VirtualServices(ns).Delete(ctx, "reviews", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	within(t, "a deleted VirtualService", func() bool {
		return report() == "DestinationRule unsupported/reviews: unsupported/reviews; HTTPRoute unsupported/ext: unsupported/reviews; Telemetry istio-system/mesh-tracing: unsupported/reviews"
	})
	if got, want := gauge(), "DestinationRule unsupported/reviews=1; HTTPRoute unsupported/ext=1; Telemetry istio-system/mesh-tracing=1"; got != want {
		t.Errorf("detour_unsupported_config after the deletion: %q, want %q", got, want)
	}

	// A session's --bind of the unbound service asks the waypoint first (UnsupportedFor).
	if us, err := d.UnsupportedFor(ns, "other"); err != nil || len(us) != 2 || us[0].Kind != "Telemetry" || us[1].Kind != "VirtualService" || us[1].Name != "other" {
		t.Fatalf("UnsupportedFor other: %+v %v", us, err)
	}
	if us, err := d.UnsupportedFor(ns, "nothing-on-it"); err != nil || len(us) != 1 || us[0].Kind != "Telemetry" {
		t.Fatalf("UnsupportedFor a service nothing applies to: %+v %v", us, err)
	}

	// Before anything is bound: doctor lists what would differ, and install --bind refuses the
	// service a VirtualService applies to unless --force (a dry run: the check comes first).
	kc := []string{"--kubeconfig", c.Kubeconfig, "-n", ns}
	if code, out := detour(t, append([]string{"doctor", "svc/other"}, kc...)...); code == 0 ||
		!strings.Contains(out, "FAIL unsupported") || !strings.Contains(out, "VirtualService unsupported/other (on unsupported/other)") ||
		!strings.Contains(out, "Telemetry istio-system/mesh-tracing (on unsupported/other): tracing") {
		t.Fatalf("doctor (exit %d):\n%s", code, out)
	}
	// (other says istio.io/use-waypoint: none, so binding it is a take-over.)
	code, out := detour(t, append([]string{"install", "--dry-run", "--bind", "svc/other", "--take-over"}, kc...)...)
	if code == 0 || !strings.Contains(out, "VirtualService unsupported/other") || !strings.Contains(out, "--force") {
		t.Fatalf("install --bind svc/other with a VirtualService on it (exit %d):\n%s", code, out)
	}
	if code, out := detour(t, append([]string{"install", "--dry-run", "--bind", "svc/other", "--take-over", "--force"}, kc...)...); code != 0 {
		t.Fatalf("install --bind svc/other --force (exit %d):\n%s", code, out)
	}
	// The namespace binds every service of it: the DestinationRule on reviews refuses it too.
	if code, out := detour(t, append([]string{"install", "--dry-run", "--bind", "namespace"}, kc...)...); code == 0 ||
		!strings.Contains(out, "DestinationRule unsupported/reviews") || !strings.Contains(out, "HTTPRoute unsupported/ext (on unsupported/reviews): not applied") {
		t.Fatalf("install --bind namespace (exit %d):\n%s", code, out)
	}
}
