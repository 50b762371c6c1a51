package mesh

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
)

// An HTTPRoute created and updated on the real API server (the Gateway API CRDs Istio serves)
// shows in the waypoint's route table: a weight change from 100/0 to 0/100 moves the traffic
// once the update is reflected (the time it took is logged; the guard is 5 s).
func TestDiscoveryHTTPRoutes(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "routes"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"reviews", "reviews-v1", "reviews-v2"} {
		if _, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{mesh.UseWaypoint: "detour"}},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	gc, err := gwclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	port := gwv1.PortNumber(80)
	weights := func(v1, v2 int32) []gwv1.HTTPBackendRef {
		ref := func(name string, w int32) gwv1.HTTPBackendRef {
			return gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: &port}, Weight: &w}}
		}
		return []gwv1.HTTPBackendRef{ref("reviews-v1", v1), ref("reviews-v2", v2)}
	}
	hr := &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: "split", Namespace: ns},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr(gwv1.Group("")), Kind: ptr(gwv1.Kind("Service")), Name: "reviews", Port: &port}}},
			Rules:           []gwv1.HTTPRouteRule{{BackendRefs: weights(100, 0)}},
		}}
	if hr, err = gc.GatewayV1().HTTPRoutes(ns).Create(ctx, hr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	d := &mesh.Discovery{Kube: c.Client, Istio: ic, Gateway: gc, Waypoint: authz.Waypoint{Namespace: ns, Gateway: "detour"}}
	runDiscovery(ctx, t, d)
	backend := func() string {
		r := httptest.NewRequest("GET", "/", nil)
		m, attached := d.HTTPRoutes().Match(ns, "reviews", 80, r, "/", false)
		if !attached || m.Rule == nil {
			return ""
		}
		if b := m.Rule.Pick(func(n int) int { return n / 2 }); b != nil {
			return b.Name
		}
		return ""
	}
	if got := backend(); got != "reviews-v1" {
		t.Fatalf("first sync: 100/0 routes to %q", got)
	}
	if hr, err = gc.GatewayV1().HTTPRoutes(ns).Get(ctx, hr.Name, metav1.GetOptions{}); err != nil { // istiod wrote its status
		t.Fatal(err)
	}
	hr.Spec.Rules[0].BackendRefs = weights(0, 100)
	if _, err := gc.GatewayV1().HTTPRoutes(ns).Update(ctx, hr, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	took := within(t, "a weight change", func() bool { return backend() == "reviews-v2" })
	if err := gc.GatewayV1().HTTPRoutes(ns).Delete(ctx, hr.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone := within(t, "a deleted route", func() bool {
		_, attached := d.HTTPRoutes().Match(ns, "reviews", 80, httptest.NewRequest("GET", "/", nil), "/", false)
		return !attached
	})
	t.Logf("reflected after: weight change %s, deletion %s", took.Round(time.Millisecond), gone.Round(time.Millisecond))
}
