package node

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/detour-mesh/detour/integration/image"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// TestAmbientNodeCrossesDetour is issue 18, acceptance 1 on the real node: the namespace is
// labelled ambient, so the pods the kubelet starts there get, at their CNI ADD, Istio CNI's
// in-pod redirection (Istio's own plugin decides and hands the netns to the test bed's node
// agent, which writes the rules with Istio's rule builder) and an in-pod ztunnel stand-in
// whose only routing input is istiod's workload xDS. detour is installed as users install it
// (`--bind namespace`). The client pod's app GETs the server's ClusterIP; nothing tells any
// stand-in where the waypoint is. Bound, the request crosses detour (its count for the
// server moves by one) and the server's app sees it coming from a detour pod; unbound (the
// namespace's use-waypoint label removed), after istiod's push the next request reaches the
// server from the client's own address and detour's counter stays. The kubelet's probes of the
// ambient pods pass through Istio CNI's host probe SNAT.
func TestAmbientNodeCrossesDetour(t *testing.T) {
	skipUnlessNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	pause, app, ref, detourTar := nodeImages(t, ctx)
	archives := writeArchives(t, t.TempDir(), map[string][]byte{"pause.tar": pause, "podapp.tar": app, "detour.tar": detourTar})
	c := testbed.Start(t, testbed.Options{Istiod: true, Node: &testbed.NodeOptions{Images: archives, SandboxImage: image.PauseRef, Ambient: true}})

	const ns = "shop"
	if err := c.Namespace(ctx, ns, map[string]string{"istio.io/dataplane-mode": "ambient"}); err != nil {
		t.Fatal(err)
	}
	logDetourOnFailure(t, c, ns)
	installDetour(t, ctx, c, ns, ref)
	deploy(t, ctx, c, ns, "server", image.PodAppRef, nil)
	deploy(t, ctx, c, ns, "client", image.PodAppRef, nil)
	server := runningPod(t, ctx, c, ns, "server")
	client := runningPod(t, ctx, c, ns, "client")
	checkEnrolled(t, ctx, c, ns, "server", "client")
	// The host's requests to an ambient pod, the kubelet's probes among them, arrive SNATed to
	// Istio CNI's probe address (its host rules), which the in-pod rules let through uncaptured.
	if code, body := get(t, "http://"+server.Status.PodIP+":8080/peer"); code != http.StatusOK || !strings.HasPrefix(body, "169.254.7.127:") {
		t.Errorf("node: the host's GET of the server's /peer = %d %q, want 200 and 169.254.7.127:PORT", code, body)
	}

	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, "server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	detourIPs := podIPs(t, ctx, c, ns, detourSelector)
	// The test watches istiod's view only to know when to look; the stand-ins have their own.
	view, err := c.WatchWorkloads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := view.WaitRoute(ctx, vip, time.Minute, func(r testbed.Target, ok bool) bool { return ok && r.Waypoint != "" }); err != nil {
		t.Fatalf("%v\nview:\n%s", err, view.Describe())
	}
	before := opened(t, detourIPs)
	// The app's GET from inside the client pod, to the ClusterIP: the server's /peer.
	peer := func() string {
		u := "http://" + client.Status.PodIP + ":8080/fetch?url=" + url.QueryEscape("http://"+vip.String()+"/peer")
		code, body, err := tryGet(u)
		status, rest, _ := strings.Cut(body, " ")
		ap, perr := netip.ParseAddrPort(strings.TrimSpace(rest))
		if err != nil || code != http.StatusOK || status != "200" || perr != nil {
			return fmt.Sprintf("GET %s: %d %q %v", u, code, body, err)
		}
		return ap.Addr().String()
	}
	wait(t, ctx, 30*time.Second, "the client's request to the server crossing detour", func() (bool, string) {
		got := peer()
		return slices.Contains(detourIPs, got), "the server saw " + got + ", detour's pods are " + strings.Join(detourIPs, ", ")
	})
	if n := opened(t, detourIPs) - before; n != 1 {
		t.Fatalf("bound: detour counted %d streams to the server, want 1", n)
	}
	t.Logf("node: bound: client %s -> %s crossed detour (the server saw a detour pod)", client.Status.PodIP, vip)

	unbind := []byte(`{"metadata":{"labels":{"` + mesh.UseWaypoint + `":null}}}`)
	if _, err := c.Client.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, unbind, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := view.WaitRoute(ctx, vip, time.Minute, func(r testbed.Target, ok bool) bool { return ok && r.Waypoint == "" }); err != nil {
		t.Fatalf("%v\nview:\n%s", err, view.Describe())
	}
	wait(t, ctx, 30*time.Second, "the client's request reaching the server directly", func() (bool, string) {
		got := peer()
		return got == client.Status.PodIP, "the server saw " + got + ", the client is " + client.Status.PodIP
	})
	if n := opened(t, detourIPs) - before; n != 1 {
		t.Fatalf("unbound: detour counted %d streams to the server, want still 1", n)
	}
	t.Logf("node: unbound: the server %s saw the client's own address", server.Status.PodIP)
}

// checkEnrolled checks that the node enrolled the Deployments' pods (and no detour pod): each
// has a stand-in and Istio CNI's annotation.
func checkEnrolled(t *testing.T, ctx context.Context, c *testbed.Cluster, ns string, apps ...string) {
	t.Helper()
	var enrolled []string
	for _, p := range c.Node.AmbientPods() {
		enrolled = append(enrolled, p.Namespace+"/"+p.Name)
	}
	for _, app := range apps {
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			if !slices.Contains(enrolled, ns+"/"+p.Name) {
				t.Errorf("node: pod %s/%s not enrolled; enrolled: %v", ns, p.Name, enrolled)
			}
			if got := p.Annotations["ambient.istio.io/redirection"]; got != "enabled" {
				t.Errorf("node: pod %s/%s has ambient.istio.io/redirection=%q, want enabled", ns, p.Name, got)
			}
		}
	}
	for _, e := range enrolled {
		if strings.HasPrefix(e, ns+"/detour-") {
			t.Errorf("node: detour's pod %s enrolled (its label istio.io/dataplane-mode=none opts it out)", e)
		}
	}
}

func podIPs(t *testing.T, ctx context.Context, c *testbed.Cluster, ns, selector string) []string {
	t.Helper()
	pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodRunning {
			ips = append(ips, p.Status.PodIP)
		}
	}
	return ips
}

// opened is what detour counted to the server, summed over its pods' metrics (15021, reached
// from the host): istio_requests_total (a stream detour parsed as HTTP) plus
// istio_tcp_connections_opened_total (an opaque one). Each crossing adds one to exactly one.
func opened(t *testing.T, ips []string) int {
	t.Helper()
	total := 0
	for _, ip := range ips {
		code, body, err := tryGetN("http://"+ip+":15021/metrics", 4<<20)
		if err != nil || code != http.StatusOK {
			t.Fatalf("node: detour's metrics at %s: %d %v", ip, code, err)
		}
		for _, l := range strings.Split(body, "\n") {
			counted := strings.HasPrefix(l, "istio_tcp_connections_opened_total{") || strings.HasPrefix(l, "istio_requests_total{")
			if counted && strings.Contains(l, `destination_service_name="server"`) {
				v, err := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
				if err != nil {
					t.Fatalf("node: detour's metric line %q: %v", l, err)
				}
				total += int(v)
			}
		}
	}
	return total
}
