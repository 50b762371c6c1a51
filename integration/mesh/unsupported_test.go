package mesh

import (
	"context"
	"strings"
	"testing"
	"time"

	networkingapi "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
)

// A VirtualService and a DestinationRule for a bound service, created on the real API server,
// are reported (UnsupportedObjects, the gauge's source); one for an unbound service is not, and
// a deleted one leaves the report.
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
	d := &mesh.Discovery{Kube: c.Client, Istio: ic, Waypoint: authz.Waypoint{Namespace: ns, Gateway: "detour"}}
	runDiscovery(ctx, t, d)
	report := func() string {
		var lines []string
		for _, u := range d.UnsupportedObjects() {
			lines = append(lines, u.Kind+" "+u.Namespace+"/"+u.Name+": "+strings.Join(u.Services, ","))
		}
		return strings.Join(lines, "; ")
	}
	want := "DestinationRule unsupported/reviews: unsupported/reviews; VirtualService unsupported/reviews: unsupported/reviews"
	if got := report(); got != want {
		t.Fatalf("reported %q, want %q", got, want)
	}
	if err := ic.NetworkingV1().VirtualServices(ns).Delete(ctx, "reviews", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	within(t, "a deleted VirtualService", func() bool {
		return report() == "DestinationRule unsupported/reviews: unsupported/reviews"
	})

	// A session's --bind of the unbound service asks the waypoint first (UnsupportedFor).
	if us, err := d.UnsupportedFor(ns, "other"); err != nil || len(us) != 1 || us[0].Kind != "VirtualService" || us[0].Name != "other" {
		t.Fatalf("UnsupportedFor other: %+v %v", us, err)
	}
	if us, err := d.UnsupportedFor(ns, "nothing-on-it"); err != nil || len(us) != 0 {
		t.Fatalf("UnsupportedFor a service nothing applies to: %+v %v", us, err)
	}

	// Before anything is bound: doctor lists what would differ, and install --bind refuses the
	// service a VirtualService applies to unless --force (a dry run: the check comes first).
	kc := []string{"--kubeconfig", c.Kubeconfig, "-n", ns}
	if code, out := detour(t, append([]string{"doctor", "svc/other"}, kc...)...); code == 0 ||
		!strings.Contains(out, "FAIL unsupported") || !strings.Contains(out, "VirtualService unsupported/other (on unsupported/other)") {
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
		!strings.Contains(out, "DestinationRule unsupported/reviews") {
		t.Fatalf("install --bind namespace (exit %d):\n%s", code, out)
	}
}
