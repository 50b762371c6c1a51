package mesh

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// Acceptance 4: two waypoint replicas. The developer's tunnel is on replica A; a stream that
// arrives at replica B is relayed to A and reaches the developer; B restarts, and streams through
// it reach the developer again.
func TestReplicasRelay(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	// The endpoint is a network-namespace pod's address: should anything dial it from here by
	// mistake, the test bed's blackhole route drops it rather than the default route.
	pod := testbed.NewNetwork(t).Pod(t, nil, ns, "db-0", "db")
	svc, err := c.Service(ctx, ns, "db", map[string]string{mesh.UseWaypoint: "detour"}, []testbed.ServicePort{{Name: "tcp", Port: 5432, TargetPort: 5432}}, pod.IP)
	if err != nil {
		t.Fatal(err)
	}
	if code, out := detour(t, "install", "-n", ns, "--kubeconfig", c.Kubeconfig); code != 0 {
		t.Fatal(out)
	}
	ic := grantSteal(t, ctx, c, ns)
	caDir := filepath.Join(t.TempDir(), "ca")
	ca, err := devca.Init(caDir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	replica := func(hboneAddr string) *it.Proc {
		cfg := filepath.Join(t.TempDir(), "waypoint.yaml")
		doc := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: "spiffe://cluster.local/ns/shop/sa/detour"}}
listeners: {hbone: %q, health: "off", tunnel: "127.0.0.1:0"}
waypoint: {namespace: shop, gateway: detour, bindTTL: 3s}
discovery: {source: kubernetes, kubernetes: {kubeconfig: %q, namespace: shop}}
`, caDir, hboneAddr, c.Kubeconfig)
		if err := os.WriteFile(cfg, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		p := start(t, "waypoint", "--config", cfg)
		p.WaitFor(t, "mesh: discovery synced")
		return p
	}
	aAddr, bAddr := freeAddr(t), freeAddr(t)
	a := replica(aAddr)
	b := replica(bAddr)
	tunnel := a.Find(t, `tunnel=(127\.0\.0\.1:\d+)`)

	// The developer's app, and the CLI holding its tunnel on replica A.
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	go func() {
		for {
			conn, err := app.Accept()
			if err != nil {
				return
			}
			go func() { defer conn.Close(); fmt.Fprintln(conn, "dev"); io.Copy(conn, conn) }()
		}
	}()
	cli := start(t, "steal", "svc/db:5432", "-n", ns, "--to", app.Addr().String(), "--waypoint", tunnel,
		"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice")
	cli.WaitFor(t, "stealing ")
	b.WaitFor(t, "relaying a session held by another replica")

	svid, err := ca.Issue("spiffe://cluster.local/ns/default/sa/client", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, _ := identity.ClientTLS(identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()}), spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/detour"))
	d := &hbone.Dialer{}
	defer d.Close()
	greet := func(via string) string {
		t.Helper()
		s, err := d.Dial(ctx, via, net.JoinHostPort(svc.Spec.ClusterIP, "5432"), hbone.DialOptions{TLSConfig: tlsCfg})
		if err != nil {
			t.Fatalf("through %s: %v", via, err)
		}
		defer s.Close()
		line, err := bufio.NewReader(s).ReadString('\n')
		if err != nil {
			t.Fatalf("through %s: %v", via, err)
		}
		return strings.TrimSpace(line)
	}
	if got := greet(aAddr); got != "dev" {
		t.Fatalf("through A (the tunnel's replica): %q", got)
	}
	if got := greet(bAddr); got != "dev" {
		t.Fatalf("through B (relayed to A): %q", got)
	}

	// Discovery updates never drop a stream: one stays open through B while the service, its
	// endpoints and the policies change.
	long, err := d.Dial(ctx, bAddr, net.JoinHostPort(svc.Spec.ClusterIP, "5432"), hbone.DialOptions{TLSConfig: tlsCfg})
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
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx, &istiosec.AuthorizationPolicy{
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
	b = replica(bAddr)
	b.WaitFor(t, "relaying a session held by another replica")
	if got := greet(bAddr); got != "dev" {
		t.Fatalf("through B after its restart: %q", got)
	}
	cli.WaitFor(t, "steal stream:")
}
