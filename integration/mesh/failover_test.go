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
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// tcpFront forwards each TCP connection to the address it points at when the connection
// arrives: what a Service or a port-forward in front of waypoint replicas is to the CLI.
type tcpFront struct {
	l  net.Listener
	mu sync.Mutex
	to string
	wg sync.WaitGroup
}

func newFront(t *testing.T, to string) *tcpFront {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &tcpFront{l: l, to: to}
	f.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			to := f.to
			f.mu.Unlock()
			f.wg.Go(func() {
				defer c.Close()
				up, err := net.Dial("tcp", to)
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{})
				go func() { io.Copy(up, c); up.Close(); close(done) }()
				io.Copy(c, up)
				c.Close()
				<-done
			})
		}
	})
	t.Cleanup(func() { l.Close(); f.wg.Wait() })
	return f
}

func (f *tcpFront) point(to string) { f.mu.Lock(); f.to = to; f.mu.Unlock() }

// Acceptance 3 of issue 19: two waypoint replicas, the developer's tunnel on A (reached through a
// front that later reaches B). A is killed: the CLI reconnects through the front to B and resumes
// the same session ID; B, which relayed the session to A as a remote one, takes it over (its
// DebugSession too), and streams through B reach the developer again. Streams through B fail only
// between the kill and the resume (the session's relay target is gone and this bed's endpoint
// answers nothing).
func TestReplicaFailover(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	pod := testbed.NewNetwork(t).Pod(t, nil, ns, "db-0", "db")
	svc, err := c.Service(ctx, ns, "db", map[string]string{mesh.UseWaypoint: "detour"}, []testbed.ServicePort{{Name: "tcp", Port: 5432, TargetPort: 5432}}, pod.IP)
	if err != nil {
		t.Fatal(err)
	}
	if code, out := detour(t, "install", "-n", ns, "--kubeconfig", c.Kubeconfig); code != 0 {
		t.Fatal(out)
	}
	grantSteal(t, ctx, c, ns)
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
	a, b := replica(aAddr), replica(bAddr)
	front := newFront(t, a.Find(t, `tunnel=(127\.0\.0\.1:\d+)`))

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
	cli := start(t, "steal", "svc/db:5432", "-n", ns, "--to", app.Addr().String(), "--waypoint", front.l.Addr().String(),
		"--transport", "h2", "--grace", "30s", "--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice")
	id := cli.Find(t, `session ([0-9a-f]{12}) over h2`)
	b.WaitFor(t, "relaying a session held by another replica")

	svid, err := ca.Issue("spiffe://cluster.local/ns/default/sa/client", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, _ := identity.ClientTLS(identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()}), spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/detour"))
	d := &hbone.Dialer{}
	defer d.Close()
	greet := func(via string) (string, error) {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		s, err := d.Dial(sctx, via, net.JoinHostPort(svc.Spec.ClusterIP, "5432"), hbone.DialOptions{TLSConfig: tlsCfg})
		if err != nil {
			return "", err
		}
		defer s.Close()
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(s).ReadString('\n')
		return strings.TrimSpace(line), err
	}
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

	front.point(b.Find(t, `tunnel=(127\.0\.0\.1:\d+)`))
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
