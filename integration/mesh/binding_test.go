package mesh

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
)

var detourBin = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "detour-mesh-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "detour")
	build := exec.Command("go", "build", "-o", bin, "./cmd/detour")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building detour: %v\n%s", err, out)
	}
	return bin, nil
})

// start runs the detour binary with args.
func start(t *testing.T, args ...string) *it.Proc {
	bin, err := detourBin()
	if err != nil {
		t.Fatal(err)
	}
	return it.Start(t, exec.Command(bin, args...))
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Acceptance 3: a steal with --bind binds an unbound service for the session; SIGKILL of the CLI
// reverts it (the tunnel dies, the session ends once its grace period, 2 s here, has passed); SIGKILL of the waypoint holding it reverts it
// through another replica's reconciler once the lease expires; istiod's view follows.
func TestSessionBinding(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Service(ctx, ns, "web", nil, []testbed.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}, "10.244.9.20"); err != nil {
		t.Fatal(err)
	}
	if code, out := detour(t, "install", "-n", ns, "--kubeconfig", c.Kubeconfig); code != 0 {
		t.Fatal(out)
	}
	readyEndpoints(t, c, ns, "detour", "10.244.9.10", 15008)
	grantSteal(t, ctx, c, ns)
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if _, err := devca.Init(caDir, "cluster.local"); err != nil {
		t.Fatal(err)
	}
	waypointProc := func() (*it.Proc, string) {
		cfg := filepath.Join(t.TempDir(), "waypoint.yaml")
		doc := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: "spiffe://cluster.local/ns/shop/sa/detour"}}
listeners: {hbone: "127.0.0.1:0", health: "off", tunnel: "127.0.0.1:0"}
waypoint: {namespace: shop, gateway: detour, bindTTL: 3s}
discovery: {source: kubernetes, kubernetes: {kubeconfig: %q, namespace: shop}}
`, caDir, c.Kubeconfig)
		if err := os.WriteFile(cfg, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		p := start(t, "waypoint", "--config", cfg)
		p.WaitFor(t, "mesh: discovery synced")
		return p, p.Find(t, `tunnel=(127\.0\.0\.1:\d+)`)
	}
	steal := func(tunnel string) *it.Proc {
		p := start(t, "steal", "svc/web:80", "-n", ns, "--to", "127.0.0.1:1", "--bind", "--waypoint", tunnel, "--grace", "2s",
			"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice")
		p.WaitFor(t, "stealing ")
		return p
	}
	host := "detour.shop.svc.cluster.local"

	a, tunA := waypointProc()
	cli := steal(tunA)
	waypointOf(t, c, ns, "web", host)
	cli.Process.Kill()
	killed := time.Now()
	waypointOf(t, c, ns, "web", "")
	t.Logf("CLI killed: binding reverted and istiod's view updated after %v", time.Since(killed).Round(100*time.Millisecond))

	cli = steal(tunA)
	waypointOf(t, c, ns, "web", host)
	a.Process.Kill() // the waypoint dies holding the binding
	<-a.Done
	killed = time.Now()
	b, _ := waypointProc() // another replica (or the restarted one)
	waypointOf(t, c, ns, "web", "")
	t.Logf("waypoint killed: another replica reverted the binding after its lease expired, %v after the kill (TTL 3s)", time.Since(killed).Round(100*time.Millisecond))
	b.WaitFor(t, "a session binding expired")
	if _, err := c.Client.CoordinationV1().Leases(ns).Get(ctx, "detour-bind-web", metav1.GetOptions{}); err == nil {
		t.Fatal("the expired lease is still there")
	}
}

// grantSteal applies an AuthorizationPolicy on the detour Gateway granting STEAL to everyone,
// and returns the Istio client it used.
func grantSteal(t *testing.T, ctx context.Context, c *testbed.Cluster, ns string) istioclient.Interface {
	t.Helper()
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx, &istiosec.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "devs", Namespace: ns},
		Spec: secv1beta1.AuthorizationPolicy{
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
			Rules:      []*secv1beta1.Rule{{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"STEAL"}}}}}},
		}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return ic
}
