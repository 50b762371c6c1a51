package mesh

import (
	"bufio"
	"fmt"
	"io"
	"testing"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Acceptance 4: two waypoint replicas. The developer's tunnel is on replica A; a stream that
// arrives at replica B is relayed to A and reaches the developer; B restarts, and streams through
// it reach the developer again.
func TestReplicasRelay(t *testing.T) {
	bed := newReplicaBed(t)
	c, ctx, ns, svc := bed.c, bed.ctx, bed.ns, bed.svc
	aAddr, bAddr := freeAddr(t), freeAddr(t)
	a := bed.replica(t, aAddr)
	b := bed.replica(t, bAddr)
	tunnel := a.Find(t, `tunnel=(127\.0\.0\.1:\d+)`)

	// The developer's app, and the CLI holding its tunnel on replica A.
	cli := start(t, "steal", "svc/db:5432", "-n", ns, "--to", devApp(t), "--waypoint", tunnel,
		"--ca", bed.caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice")
	cli.WaitFor(t, "stealing ")
	b.WaitFor(t, "relaying a session held by another replica")

	greet := func(via string) string {
		t.Helper()
		got, err := bed.greet(via)
		if err != nil {
			t.Fatalf("through %s: %v", via, err)
		}
		return got
	}
	if got := greet(aAddr); got != "dev" {
		t.Fatalf("through A (the tunnel's replica): %q", got)
	}
	if got := greet(bAddr); got != "dev" {
		t.Fatalf("through B (relayed to A): %q", got)
	}

	// Discovery updates never drop a stream: one stays open through B while the service, its
	// endpoints and the policies change.
	long, err := bed.dial(ctx, bAddr)
	if err != nil {
		t.Fatal(err)
	}
	longR := bufio.NewReader(long)
	if line, err := longR.ReadString('\n'); err != nil || line != "dev\n" {
		t.Fatalf("long stream: %q %v", line, err)
	}
	if svc, err = c.Client.CoreV1().Services(ns).Get(ctx, "db", metav1.GetOptions{}); err != nil { // istiod writes its binding status
		t.Fatal(err)
	}
	svc.Labels["touched"] = "yes"
	if _, err := c.Client.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := bed.ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx, &istiosec.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "unrelated", Namespace: ns},
		Spec: secv1beta1.AuthorizationPolicy{Action: secv1beta1.AuthorizationPolicy_DENY,
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "other"}},
			Rules:      []*secv1beta1.Rule{{}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Client.DiscoveryV1().EndpointSlices(ns).Delete(ctx, "db-testbed", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // several rebuilds
	for i := range 3 {
		msg := fmt.Sprintf("still here %d\n", i)
		io.WriteString(long, msg)
		if line, err := longR.ReadString('\n'); err != nil || line != msg {
			t.Fatalf("the long stream after discovery updates: %q %v", line, err)
		}
	}
	long.Close()
	b.Process.Kill()
	<-b.Done
	b = bed.replica(t, bAddr)
	b.WaitFor(t, "relaying a session held by another replica")
	if got := greet(bAddr); got != "dev" {
		t.Fatalf("through B after its restart: %q", got)
	}
	cli.WaitFor(t, "steal stream:")
}
