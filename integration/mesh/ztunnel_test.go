package mesh

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// ambientBed is an ambient namespace shop with detour installed, detour's pod detour-0 (the
// labels its Service selects, a ready EndpointSlice: no endpoint controller) and db's pod db-0
// behind service db (5432 -> 15432) labelled to use detour; view is ztunnel's view of it.
type ambientBed struct {
	c      *testbed.Cluster
	ctx    context.Context
	wp, db *testbed.Pod
	svc    *corev1.Service
	view   *testbed.WorkloadView
	net    *testbed.Network
}

func newAmbientBed(t *testing.T) *ambientBed {
	t.Helper()
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
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
	return &ambientBed{c: c, ctx: ctx, wp: wp, db: db, svc: svc, view: view, net: net}
}

func (b *ambientBed) vip() netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr(b.svc.Spec.ClusterIP), 5432)
}

// unbind removes db's istio.io/use-waypoint label.
func (b *ambientBed) unbind(t *testing.T) {
	t.Helper()
	unbind := []byte(`{"metadata":{"labels":{"` + mesh.UseWaypoint + `":null}}}`)
	if _, err := b.c.Client.CoreV1().Services("shop").Patch(b.ctx, "db", types.MergePatchType, unbind, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// Issue 18, acceptance 1 (its control-plane half): the route ztunnel takes to a service comes
// from istiod's workload xDS only. With detour installed and the service labelled to use it,
// the stand-in's view (subscribed as ztunnel subscribes) sends db's VIP to detour's pod on its
// HBONE port, with authority VIP:port and detour's service account as the identity to check;
// unlabelled, straight to db's pod. Nothing in the test tells the view where the waypoint is.
func TestZtunnelRoutesFromIstiodXDS(t *testing.T) {
	b := newAmbientBed(t)
	ctx, view, wp, db, vip := b.ctx, b.view, b.wp, b.db, b.vip()
	want := testbed.Target{Waypoint: wp.IP + ":15008", WaypointIdentity: "spiffe://cluster.local/ns/shop/sa/detour", Authority: vip.String(), Workloads: []string{db.IP + ":15432"}}
	got, err := view.WaitRoute(ctx, vip, time.Minute, func(r testbed.Target, ok bool) bool { return ok && equalTarget(r, want) })
	if err != nil {
		t.Fatalf("bound: %v\nwant %+v\nview:\n%s", err, want, view.Describe())
	}
	t.Logf("bound: %+v (view holds %d addresses)", got, view.Len())

	// Unbinding sends it back to the pod directly.
	b.unbind(t)
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

// startWaypoint runs detour's waypoint in detour-0's network namespace with istiod's
// certificate for shop/detour and db from static discovery (the pod cannot reach the loopback
// API server; the route under test is the ztunnel stand-in's, not detour's discovery).
func (b *ambientBed) startWaypoint(t *testing.T) {
	t.Helper()
	wpID, err := b.c.Workload(b.ctx, "shop", "detour")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cert, key, bundle, err := wpID.WriteFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "waypoint.yaml")
	doc := fmt.Sprintf(`identity: {source: files, files: {cert: %q, key: %q, bundle: %q}}
listeners: {hbone: "%s:15008", health: "%s:15021", tunnel: "127.0.0.1:0"}
waypoint: {namespace: shop, gateway: detour}
discovery:
  static:
    services:
    - name: db
      namespace: shop
      vips: [%s]
      ports: [{name: tcp, port: 5432, targetPort: 15432}]
      endpoints: [{ip: %s, serviceAccount: db}]
`, cert, key, bundle, b.wp.IP, b.wp.IP, b.svc.Spec.ClusterIP, b.db.IP)
	if err := os.WriteFile(cfg, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	bin, err := detourBin()
	if err != nil {
		t.Fatal(err)
	}
	wp := it.Start(t, b.wp.Command(bin, "waypoint", "--config", cfg))
	wp.WaitFor(t, "waypoint serving")
}

// opened is detour's istio_tcp_connections_opened_total for db, read from inside detour's pod.
func (b *ambientBed) opened(t *testing.T) string {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: b.wp.DialContext}, Timeout: 10 * time.Second}
	resp, err := hc.Get("http://" + b.wp.IP + ":15021/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "istio_tcp_connections_opened_total{") && strings.Contains(l, `destination_service_name="db"`) {
			return l[strings.LastIndexByte(l, ' ')+1:]
		}
	}
	return "0"
}

// Issue 18, acceptance 1 (the data path, short of captured traffic): a client pod's ztunnel
// stand-in takes its route to db from istiod's xDS alone and sends the stream there with its
// istiod-issued identity; bound, it crosses detour's waypoint (running in detour-0's network
// namespace with an istiod-issued identity, forwarding to db's pod over HBONE), which logs it;
// unbound, it goes to db's pod directly and detour sees nothing more.
func TestZtunnelStandInCrossesDetour(t *testing.T) {
	b := newAmbientBed(t)
	ctx, c := b.ctx, b.c
	const ns = "shop"
	dbID, err := c.Workload(ctx, ns, "db")
	if err != nil {
		t.Fatal(err)
	}
	b.db.RunIstioHBONE(t, dbID)
	b.db.Run(t, b.db.IP+":15432", "echo", b.db.IP+":15432", "db")

	b.startWaypoint(t)

	client := b.net.Pod(t, c, ns, "sleep-0", "sleep")
	clientID, err := c.Workload(ctx, ns, "sleep")
	if err != nil {
		t.Fatal(err)
	}
	z := testbed.NewZtunnel(clientID, client.DialContext)
	defer z.Close()
	greet := func(r testbed.Target) string {
		t.Helper()
		to, id := r.Waypoint, r.WaypointIdentity
		if to == "" { // direct: the workload's own ztunnel inbound
			to, id = netip.MustParseAddrPort(r.Workloads[0]).Addr().String()+":15008", dbID.SVID.ID.String()
		}
		authority := r.Authority
		if r.Waypoint == "" {
			authority = r.Workloads[0]
		}
		s, err := z.Dial(ctx, to, id, authority, netip.MustParseAddrPort(client.IP+":41234"))
		if err != nil {
			t.Fatalf("via %s as %s: %v", to, authority, err)
		}
		defer s.Close()
		line, err := bufio.NewReader(s).ReadString('\n')
		if err != nil {
			t.Fatalf("via %s as %s: %v", to, authority, err)
		}
		return strings.TrimSpace(line)
	}
	bound, err := b.view.WaitRoute(ctx, b.vip(), time.Minute, func(r testbed.Target, ok bool) bool { return ok && r.Waypoint != "" })
	if err != nil {
		t.Fatal(err)
	}
	if got := greet(bound); got != "db" {
		t.Fatalf("through the waypoint: %q", got)
	}
	if n := b.opened(t); n != "1" {
		t.Fatalf("detour counted %s streams to db, want 1", n)
	}
	b.unbind(t)
	direct, err := b.view.WaitRoute(ctx, b.vip(), time.Minute, func(r testbed.Target, ok bool) bool { return ok && r.Waypoint == "" })
	if err != nil {
		t.Fatal(err)
	}
	if got := greet(direct); got != "db" {
		t.Fatalf("direct: %q", got)
	}
	if n := b.opened(t); n != "1" {
		t.Fatalf("unbound, detour counted %s streams to db, want still 1", n)
	}
}

// Issue 18, acceptance 1 with captured traffic: sleep-0 and db-0 are ambient pods (Istio CNI's
// in-pod rules written by Istio's own rule builder, the enrolled annotation) each served by the
// in-pod ztunnel stand-in, whose only routing input is istiod's workload xDS. sleep-0's app makes
// a plain TCP connect to db's ClusterIP; nothing tells anyone where the waypoint is. Bound, the
// connection crosses detour (its counter moves) and db's app sees it coming from detour's pod
// (ztunnel's inbound spoofs the HBONE peer's address); unbound, the next connection goes
// straight to db's pod and db's app sees sleep-0's own address, detour's counter unchanged.
// A destination istiod does not know (a bare netns) is passed through.
func TestCapturedTrafficCrossesDetour(t *testing.T) {
	b := newAmbientBed(t)
	ctx, c := b.ctx, b.c
	const ns = "shop"
	dbID, err := c.Workload(ctx, ns, "db")
	if err != nil {
		t.Fatal(err)
	}
	b.db.EnrollAmbient(t, c)
	b.db.ServeZtunnel(t, dbID, b.view)
	serveApp(t, b.db, "0.0.0.0:15432", "db")
	b.startWaypoint(t)

	client := b.net.Pod(t, c, ns, "sleep-0", "sleep")
	clientID, err := c.Workload(ctx, ns, "sleep")
	if err != nil {
		t.Fatal(err)
	}
	client.EnrollAmbient(t, c)
	client.ServeZtunnel(t, clientID, b.view)
	outside := b.net.Pod(t, nil, "none", "outside", "none")
	serveApp(t, outside, "0.0.0.0:9000", "outside")

	// The app: a plain TCP connect from inside sleep-0, reading the server's one line.
	app := func(addr string) string {
		t.Helper()
		conn, err := client.DialContext(ctx, "tcp", addr)
		if err != nil {
			t.Fatalf("connecting to %s: %v", addr, err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			t.Fatalf("reading from %s: %v", addr, err)
		}
		return strings.TrimSpace(line)
	}
	from := func(line, app string) string { // "db 10.244.1.2:41234" -> "10.244.1.2"
		t.Helper()
		name, peer, _ := strings.Cut(line, " ")
		ap, err := netip.ParseAddrPort(peer)
		if name != app || err != nil {
			t.Fatalf("want %q and its peer, got %q", app, line)
		}
		return ap.Addr().String()
	}
	// Bounded waits for istiod's push: the stand-ins read the same view; the test only watches it.
	bound := func(r testbed.Target, ok bool) bool {
		return ok && r.Waypoint != "" && len(r.Endpoints) == 1 && r.Endpoints[0].HBONE
	}
	if _, err := b.view.WaitRoute(ctx, b.vip(), time.Minute, bound); err != nil {
		t.Fatalf("%v\nview:\n%s", err, b.view.Describe())
	}
	enrolled := func(r testbed.Target, ok bool) bool { return ok && len(r.Endpoints) == 1 && r.Endpoints[0].HBONE }
	if _, err := b.view.WaitRoute(ctx, netip.MustParseAddrPort(client.IP+":1"), time.Minute, enrolled); err != nil {
		t.Fatalf("sleep-0 never enrolled in istiod's view: %v", err)
	}
	// The baggage sleep-0's stand-in sends, from istiod's view of sleep-0 (src/baggage.rs).
	if bg := b.view.Baggage(netip.MustParseAddr(client.IP)); !strings.Contains(bg, "k8s.namespace.name=shop") {
		t.Fatalf("sleep-0's baggage %q names no namespace", bg)
	}
	if got := from(app(b.vip().String()), "db"); got != b.wp.IP {
		t.Fatalf("bound: db's app saw the connection from %s, want detour's pod %s", got, b.wp.IP)
	}
	if n := b.opened(t); n != "1" {
		t.Fatalf("bound: detour counted %s connections to db, want 1", n)
	}
	if got := from(app(outside.IP+":9000"), "outside"); got != client.IP {
		t.Fatalf("passthrough: the outside app saw %s, want sleep-0's %s", got, client.IP)
	}

	b.unbind(t)
	if _, err := b.view.WaitRoute(ctx, b.vip(), time.Minute, func(r testbed.Target, ok bool) bool { return ok && r.Waypoint == "" }); err != nil {
		t.Fatal(err)
	}
	if got := from(app(b.vip().String()), "db"); got != client.IP {
		t.Fatalf("unbound: db's app saw the connection from %s, want sleep-0's %s", got, client.IP)
	}
	if n := b.opened(t); n != "1" {
		t.Fatalf("unbound: detour counted %s connections to db, want still 1", n)
	}
}

// serveApp is the pod's app: on each connection it writes name and the peer address it sees, then
// closes. It stops, and is waited for, when the test ends.
func serveApp(t *testing.T, p *testbed.Pod, addr, name string) {
	t.Helper()
	l, err := p.Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s %s\n", name, c.RemoteAddr())
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
}
