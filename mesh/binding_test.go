package mesh_test

import (
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"github.com/detour-mesh/detour/mesh"
)

// A bound session resumed on another replica takes its binding over (the lease carries the
// session's ID): the first replica's release then leaves the binding alone, and only the new
// holder's release reverts it. Another session still cannot bind the service.
func TestBindMovesWithItsSession(t *testing.T) {
	ctx := context.Background()
	kube := kubefake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"}})
	replica := func(name string) *mesh.Binder {
		return &mesh.Binder{Kube: kube, Waypoint: "detour", Namespace: "shop", Holder: name}
	}
	a, b := replica("detour-a"), replica("detour-b")
	state := func() (label, holder, session string) {
		t.Helper()
		s, err := kube.CoreV1().Services("shop").Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		label = s.Labels[mesh.UseWaypoint]
		if l, err := kube.CoordinationV1().Leases("shop").Get(ctx, "detour-bind-web", metav1.GetOptions{}); err == nil {
			holder, session = *l.Spec.HolderIdentity, l.Annotations[mesh.LeaseSession]
		}
		return label, holder, session
	}
	releaseA, err := a.Bind(ctx, "shop", "web", "0123456789ab")
	if err != nil {
		t.Fatal(err)
	}
	if label, holder, session := state(); label != "detour" || holder != "detour-a" || session != "0123456789ab" {
		t.Fatalf("bound: label %q, lease holder %q, session %q", label, holder, session)
	}
	if _, err := b.Bind(ctx, "shop", "web", "ba9876543210"); err == nil || !strings.Contains(err.Error(), "already has istio.io/use-waypoint=detour") {
		t.Fatalf("another session's bind: %v", err)
	}
	releaseB, err := b.Bind(ctx, "shop", "web", "0123456789ab")
	if err != nil {
		t.Fatalf("the resumed session's bind on another replica: %v", err)
	}
	if label, holder, _ := state(); label != "detour" || holder != "detour-b" {
		t.Fatalf("taken over: label %q, lease holder %q", label, holder)
	}
	releaseA()
	if label, holder, _ := state(); label != "detour" || holder != "detour-b" {
		t.Fatalf("after the first replica's release: label %q, lease holder %q", label, holder)
	}
	releaseB()
	if label, holder, _ := state(); label != "" || holder != "" {
		t.Fatalf("after the holder's release: label %q, lease holder %q", label, holder)
	}
}
