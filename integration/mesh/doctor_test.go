package mesh

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/cmd/detour/cli"
	"github.com/detour-mesh/detour/integration/testbed"
)

// Acceptance 6: `detour doctor` names each failure mode with its fix, and passes once all are
// fixed.
func TestDoctor(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const ns = "store"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Service(ctx, ns, "web", map[string]string{"istio.io/use-waypoint": "other"}, []testbed.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}, "10.244.8.20"); err != nil {
		t.Fatal(err)
	}
	args := []string{"doctor", "svc/web", "-n", ns, "--kubeconfig", c.Kubeconfig, "--developer", "spiffe://cluster.local/ns/dev/sa/alice",
		"--istiod", "http://" + c.Istiod.HTTPAddr + "/debug/ambientz"}
	expect := func(want ...string) string {
		t.Helper()
		code, out := detour(t, args...)
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Fatalf("doctor (exit %d) lacks %q:\n%s", code, w, out)
			}
		}
		return out
	}
	out := expect(
		"FAIL ambient   namespace store is not in ambient mode", "fix:      kubectl label namespace store istio.io/dataplane-mode=ambient",
		"FAIL gateway   no Gateway store/detour", "fix:      detour install -n store",
		"FAIL endpoints service detour.store.svc.cluster.local has no ready endpoint",
		"FAIL binding   service web is bound to another waypoint, other (service web)", "--take-over",
		"FAIL policy    cluster.local/ns/dev/sa/alice may not STEAL from web.store.svc.cluster.local",
		`FAIL istiod    istiod tells ztunnel that web's waypoint is ""`,
		"detour: 6 problem(s) found")
	t.Logf("doctor, nothing set up:\n%s", out)
	// The same findings, as JSON on stdout (the count of problems on stderr).
	var stdout, stderr bytes.Buffer
	code := cli.Run(ctx, append(args, "-o", "json"), &stdout, &stderr)
	type finding struct {
		Check string `json:"check"`
		OK    bool   `json:"ok"`
		Say   string `json:"say"`
		Fix   string `json:"fix"`
	}
	var findings []finding
	if err := json.Unmarshal(stdout.Bytes(), &findings); err != nil || code != 1 || stderr.String() != "detour: 6 problem(s) found\n" {
		t.Fatalf("doctor -o json: exit %d, %v, %q\n%s", code, err, stderr.String(), stdout.String())
	}
	if failed := slices.IndexFunc(findings, func(f finding) bool {
		return f.Check == "ambient" && !f.OK && f.Fix == "kubectl label namespace store istio.io/dataplane-mode=ambient"
	}); failed < 0 {
		t.Fatalf("doctor -o json lacks the ambient finding: %+v", findings)
	}

	n, _ := c.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	n.Labels["istio.io/dataplane-mode"] = "ambient"
	if _, err := c.Client.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if code, out := detour(t, "install", "-n", ns, "--kubeconfig", c.Kubeconfig, "--bind", "svc/web", "--take-over"); code != 0 {
		t.Fatal(out)
	}
	expect("ok   ambient", "ok   binding   web is bound to waypoint detour (service web)", "FAIL endpoints", "FAIL gateway   Gateway store/detour is not Programmed")
	readyEndpoints(t, c, ns, "detour", "10.244.8.10", 15008)
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	grant := &istiosec.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "alice-steals", Namespace: ns},
		Spec: secv1beta1.AuthorizationPolicy{
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
			Rules: []*secv1beta1.Rule{{
				From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{"cluster.local/ns/dev/sa/alice"}}}},
				To:   []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"STEAL"}}}},
			}},
		}}
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx, grant, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waypointOf(t, c, ns, "web", "detour.store.svc.cluster.local")
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, out := detour(t, args...)
		if code == 0 {
			t.Logf("doctor, all fixed:\n%s", out)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("doctor still unhappy:\n%s", out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
