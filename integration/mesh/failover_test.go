package mesh

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"

	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/mesh"
)

// Acceptance 3 of issue 19: two waypoint replicas, the developer's tunnel on A (reached through a
// front that later reaches B). A is killed: the CLI reconnects through the front to B and resumes
// the same session ID; B, which relayed the session to A as a remote one, takes it over (its
// DebugSession too), and streams through B reach the developer again. Streams through B fail only
// between the kill and the resume (the session's relay target is gone and this bed's endpoint
// answers nothing).
func TestReplicaFailover(t *testing.T) {
	bed := newReplicaBed(t)
	c, ctx, ns := bed.c, bed.ctx, bed.ns
	aAddr, bAddr := freeAddr(t), freeAddr(t)
	a, b := bed.replica(t, aAddr), bed.replica(t, bAddr)
	front := it.NewFront(t, a.Find(t, `tunnel=(127\.0\.0\.1:\d+)`))

	cli := start(t, "steal", "svc/db:5432", "-n", ns, "--to", devApp(t), "--waypoint", front.Addr(),
		"--transport", "h2", "--grace", "30s", "--ca", bed.caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice")
	id := cli.Find(t, `session ([0-9a-f]{12}) over h2`)
	b.WaitFor(t, "relaying a session held by another replica")

	greet := bed.greet
	if got, err := greet(bAddr); got != "dev" {
		t.Fatalf("through B (relayed to A): %q %v", got, err)
	}
	dyn, err := dynamic.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	holder := func() string {
		obj, err := dyn.Resource(mesh.GVRDebugSession).Namespace(ns).Get(ctx, id, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("DebugSession %s: %v", id, err)
		}
		r, _, _ := unstructured.NestedString(obj.Object, "spec", "replica")
		return r
	}
	before := holder()

	front.Point(b.Find(t, `tunnel=(127\.0\.0\.1:\d+)`))
	a.Process.Kill()
	<-a.Done
	killed := time.Now()
	back := cli.Find(t, `back: session ([0-9a-f]{12}) resumed over h2`)
	resumed := time.Now()
	if back != id {
		t.Fatalf("the session came back as %s, want %s", back, id)
	}
	b.WaitFor(t, "mesh: taking over a session another replica held")
	t.Logf("session %s resumed on B %v after A was killed", id, resumed.Sub(killed).Round(100*time.Millisecond))
	for i := range 20 {
		if got, err := greet(bAddr); got != "dev" {
			t.Fatalf("stream %d through B after the resume: %q %v", i, got, err)
		}
	}
	if after := holder(); after == before || after == "" {
		t.Fatalf("the DebugSession names replica %q after the take-over, %q before", after, before)
	}
}
