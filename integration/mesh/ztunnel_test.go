package mesh

import (
	"context"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// Issue 18, acceptance 1 (its control-plane half): the route ztunnel takes to a service comes
// from istiod's workload xDS only. With detour installed and the service labelled to use it,
// the stand-in's view (subscribed as ztunnel subscribes) sends db's VIP to detour's pod on its
// HBONE port, with authority VIP:port and detour's service account as the identity to check;
// unlabelled, straight to db's pod. Nothing in the test tells the view where the waypoint is.
func TestZtunnelRoutesFromIstiodXDS(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, map[string]string{"istio.io/dataplane-mode": "ambient"}); err != nil {
		t.Fatal(err)
	}
	if code, out := detour(t, "install", "-n", ns, "--kubeconfig", c.Kubeconfig); code != 0 {
		t.Fatal(out)
	}
	net := testbed.NewNetwork(t)
	// detour's pod as its Deployment would make it (the labels its Service selects), and db's.
	wp := net.Pod(t, c, ns, "detour-0", "detour")
	patch := []byte(`{"metadata":{"labels":{"app.kubernetes.io/name":"detour","istio.io/dataplane-mode":"none"}}}`)
	if _, err := c.Client.CoreV1().Pods(ns).Patch(ctx, wp.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	readyEndpoints(t, c, ns, "detour", wp.IP, 15008) // no endpoint controller: the test plays it
	db := net.Pod(t, c, ns, "db-0", "db")
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: ns, Labels: map[string]string{mesh.UseWaypoint: "detour"}},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "db-0"},
			Ports: []corev1.ServicePort{{Name: "tcp", Port: 5432, TargetPort: intstr.FromInt32(15432), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	view, err := c.WatchWorkloads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 5432)
	want := testbed.Target{Waypoint: wp.IP + ":15008", WaypointIdentity: "spiffe://cluster.local/ns/shop/sa/detour", Authority: vip.String(), Workloads: []string{db.IP + ":15432"}}
	got, err := view.WaitRoute(ctx, vip, time.Minute, func(r testbed.Target, ok bool) bool { return ok && equalTarget(r, want) })
	if err != nil {
		t.Fatalf("bound: %v\nwant %+v\nview:\n%s", err, want, view.Describe())
	}
	t.Logf("bound: %+v (view holds %d addresses)", got, view.Len())

	// Unbinding sends it back to the pod directly.
	unbind := []byte(`{"metadata":{"labels":{"` + mesh.UseWaypoint + `":null}}}`)
	if _, err := c.Client.CoreV1().Services(ns).Patch(ctx, "db", types.MergePatchType, unbind, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	want = testbed.Target{Authority: vip.String(), Workloads: []string{db.IP + ":15432"}}
	if _, err := view.WaitRoute(ctx, vip, time.Minute, func(r testbed.Target, ok bool) bool { return ok && equalTarget(r, want) }); err != nil {
		t.Fatalf("unbound: %v\nwant %+v\nview:\n%s", err, want, view.Describe())
	}
}

func equalTarget(a, b testbed.Target) bool {
	if a.Waypoint != b.Waypoint || a.WaypointIdentity != b.WaypointIdentity || a.Authority != b.Authority || len(a.Workloads) != len(b.Workloads) {
		return false
	}
	for i := range a.Workloads {
		if a.Workloads[i] != b.Workloads[i] {
			return false
		}
	}
	return true
}
