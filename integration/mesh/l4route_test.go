package mesh

import (
	"context"
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

// A TCPRoute and a TLSRoute created on the real API server (gateway.networking.k8s.io/v1, the
// version Istio serves and reads) show in the waypoint's L4 route table; a TCPRoute weight
// change moves new connections once reflected (the time it took is logged; the guard is 5 s).
func TestDiscoveryL4Routes(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "l4routes"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"db", "db-v1", "db-v2"} {
		if _, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{mesh.UseWaypoint: "detour"}},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "tcp", Port: 5432, Protocol: corev1.ProtocolTCP},
				{Name: "tls", Port: 443, Protocol: corev1.ProtocolTCP}}},
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
	weights := func(port gwv1.PortNumber, v1, v2 int32) []gwv1.BackendRef {
		ref := func(name string, w int32) gwv1.BackendRef {
			return gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: &port}, Weight: &w}
		}
		return []gwv1.BackendRef{ref("db-v1", v1), ref("db-v2", v2)}
	}
	parent := func(port gwv1.PortNumber) gwv1.CommonRouteSpec {
		return gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr(gwv1.Group("")), Kind: ptr(gwv1.Kind("Service")), Name: "db", Port: &port}}}
	}
	tr := &gwv1.TCPRoute{ObjectMeta: metav1.ObjectMeta{Name: "split", Namespace: ns},
		Spec: gwv1.TCPRouteSpec{CommonRouteSpec: parent(5432), Rules: []gwv1.TCPRouteRule{{BackendRefs: weights(5432, 100, 0)}}}}
	if tr, err = gc.GatewayV1().TCPRoutes(ns).Create(ctx, tr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := gc.GatewayV1().TLSRoutes(ns).Create(ctx, &gwv1.TLSRoute{ObjectMeta: metav1.ObjectMeta{Name: "sni", Namespace: ns},
		Spec: gwv1.TLSRouteSpec{CommonRouteSpec: parent(443), Hostnames: []gwv1.Hostname{"*.example.com"},
			Rules: []gwv1.TLSRouteRule{{BackendRefs: weights(443, 0, 1)}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	d := &mesh.Discovery{Kube: c.Client, Istio: ic, Gateway: gc, Waypoint: authz.Waypoint{Namespace: ns, Gateway: "detour"}}
	runDiscovery(ctx, t, d)
	backend := func(port uint16, tls bool, sni string) string {
		rule := d.L4Routes().For(ns, "db", port).Match(tls, sni)
		if rule == nil {
			return ""
		}
		if b := rule.Pick(func(n int) int { return n / 2 }); b != nil {
			return b.Name
		}
		return ""
	}
	if got := backend(5432, false, ""); got != "db-v1" {
		t.Fatalf("first sync: TCPRoute 100/0 routes to %q", got)
	}
	if got := backend(443, true, "api.example.com"); got != "db-v2" {
		t.Fatalf("first sync: TLSRoute *.example.com routes api.example.com to %q", got)
	}
	if got := backend(443, true, "api.example.org"); got != "" {
		t.Fatalf("TLSRoute *.example.com takes api.example.org (to %q)", got)
	}
	if tr, err = gc.GatewayV1().TCPRoutes(ns).Get(ctx, tr.Name, metav1.GetOptions{}); err != nil { // istiod wrote its status
		t.Fatal(err)
	}
	tr.Spec.Rules[0].BackendRefs = weights(5432, 0, 100)
	if _, err := gc.GatewayV1().TCPRoutes(ns).Update(ctx, tr, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	took := within(t, "a weight change", func() bool { return backend(5432, false, "") == "db-v2" })
	if err := gc.GatewayV1().TCPRoutes(ns).Delete(ctx, tr.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone := within(t, "a deleted route", func() bool { return d.L4Routes().For(ns, "db", 5432) == nil })
	t.Logf("reflected after: weight change %s, deletion %s", took.Round(time.Millisecond), gone.Round(time.Millisecond))
}
