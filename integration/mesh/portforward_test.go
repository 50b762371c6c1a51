package mesh

import (
	"context"
	"github.com/detour-mesh/detour/identity/devca"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/integration/testbed"
)

// --port-forward finds a ready waypoint pod by label and forwards through the API server. The
// test bed has no kubelet, so the forward itself cannot succeed here: this checks the pod choice
// and the messages on both sides of it.
func TestPortForwardFindsTheWaypointPod(t *testing.T) {
	c := testbed.Start(t, testbed.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	caDir := t.TempDir()
	if _, err := devca.Init(caDir, "cluster.local"); err != nil { // the CLI reads its identity before it dials
		t.Fatal(err)
	}
	args := []string{"steal", "svc/web:80", "-n", ns, "--to", "127.0.0.1:1", "--port-forward", ns, "--kubeconfig", c.Kubeconfig,
		"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice"}
	if code, out := detour(t, args...); code == 0 || !strings.Contains(out, "mesh: no pod of waypoint detour in shop (label app.kubernetes.io/name=detour): install it with detour install -n shop, or name the waypoint as --port-forward NAMESPACE/NAME") {
		t.Fatalf("no waypoint pod: %d %s", code, out)
	}
	pod, err := c.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "detour-0", Labels: map[string]string{"app.kubernetes.io/name": "detour"}},
		Spec: corev1.PodSpec{NodeName: "nowhere", Containers: []corev1.Container{{Name: "detour", Image: "none.invalid/detour"}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if code, out := detour(t, args...); code == 0 || !strings.Contains(out, "mesh: no Ready pod of waypoint detour in shop (detour-0 Pending): detour doctor -n shop explains why") {
		t.Fatalf("a pod, not Ready: %d %s", code, out)
	}
	pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if _, err := c.Client.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	code, out := detour(t, args...)
	if code == 0 || !strings.Contains(out, "port-forward to shop/detour-0") {
		t.Fatalf("with a ready pod (and no kubelet): %d %s", code, out)
	}
	t.Logf("as expected without a kubelet: %s", strings.TrimSpace(out))
}
