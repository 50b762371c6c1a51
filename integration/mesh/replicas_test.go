package mesh

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// replicaBed is what the multi-replica tests share: namespace shop with detour installed and
// STEAL granted, a service db (5432) bound to detour whose endpoint is a network-namespace pod
// (should anything dial it from here by mistake, the test bed's blackhole route drops it rather
// than the default route), a dev CA, and a mesh client that dials the service through a replica.
type replicaBed struct {
	c     *testbed.Cluster
	ctx   context.Context
	ns    string
	svc   *corev1.Service
	ic    istioclient.Interface
	caDir string
	ca    *devca.CA
	net   *testbed.Network
	tls   *tls.Config
	d     *hbone.Dialer
}

func newReplicaBed(t *testing.T) *replicaBed {
	t.Helper()
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	b := &replicaBed{c: c, ctx: ctx, ns: "shop"}
	if err := c.Namespace(ctx, b.ns, nil); err != nil {
		t.Fatal(err)
	}
	b.net = testbed.NewNetwork(t)
	pod := b.net.Pod(t, nil, b.ns, "db-0", "db")
	svc, err := c.Service(ctx, b.ns, "db", map[string]string{mesh.UseWaypoint: "detour"}, []testbed.ServicePort{{Name: "tcp", Port: 5432, TargetPort: 5432}}, pod.IP)
	if err != nil {
		t.Fatal(err)
	}
	b.svc = svc
	if code, out := detour(t, "install", "-n", b.ns, "--kubeconfig", c.Kubeconfig); code != 0 {
		t.Fatal(out)
	}
	b.ic = grantSteal(t, ctx, c, b.ns)
	b.caDir = filepath.Join(t.TempDir(), "ca")
	ca, err := devca.Init(b.caDir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	b.ca = ca
	svid, err := ca.Issue("spiffe://cluster.local/ns/default/sa/client", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	b.tls, _ = identity.ClientTLS(identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()}), spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/detour"))
	b.d = &hbone.Dialer{}
	t.Cleanup(func() { b.d.Close() })
	return b
}

// replica starts a waypoint replica of shop/detour serving HBONE on hboneAddr, and waits until
// its discovery has synced.
func (b *replicaBed) replica(t *testing.T, hboneAddr string) *it.Proc {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "waypoint.yaml")
	doc := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: "spiffe://cluster.local/ns/shop/sa/detour"}}
listeners: {hbone: %q, health: "off", tunnel: "127.0.0.1:0"}
waypoint: {namespace: shop, gateway: detour, bindTTL: 3s}
discovery: {source: kubernetes, kubernetes: {kubeconfig: %q, namespace: shop}}
`, b.caDir, hboneAddr, b.c.Kubeconfig)
	if err := os.WriteFile(cfg, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	p := start(t, "waypoint", "--config", cfg)
	p.WaitFor(t, "mesh: discovery synced")
	return p
}

// devApp is the developer's app: it greets each connection with "dev" and echoes the rest.
func devApp(t *testing.T) string {
	t.Helper()
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Close() })
	go func() {
		for {
			conn, err := app.Accept()
			if err != nil {
				return
			}
			go func() { defer conn.Close(); fmt.Fprintln(conn, "dev"); io.Copy(conn, conn) }()
		}
	}()
	return app.Addr().String()
}

// dial opens a mesh stream to db:5432 through the replica at via.
func (b *replicaBed) dial(ctx context.Context, via string) (*hbone.Stream, error) {
	return b.d.Dial(ctx, via, net.JoinHostPort(b.svc.Spec.ClusterIP, "5432"), hbone.DialOptions{TLSConfig: b.tls})
}

// greet dials db:5432 through via and returns the first line the far end sends.
func (b *replicaBed) greet(via string) (string, error) {
	ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
	defer cancel()
	s, err := b.dial(ctx, via)
	if err != nil {
		return "", err
	}
	defer s.Close()
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(s).ReadString('\n')
	return strings.TrimSpace(line), err
}
