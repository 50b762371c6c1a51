package node

import (
	"bytes"
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/image"
	"github.com/detour-mesh/detour/integration/testbed"
)

// The load of TestWaypointPodDeleted: a fixed count of requests at a fixed rate; the request
// whose start triggers the deletion.
const (
	drainRequests = 4000
	drainEvery    = 5 * time.Millisecond // 200 requests/s: 20 s
	drainDeleteAt = 800                  // 4 s in
)

// TestWaypointPodDeleted is issue 18, acceptance 3: a detour pod deleted under a bounded load of
// 200 requests/s. detour is installed with `detour install --bind namespace` (2 replicas, its
// terminationGracePeriodSeconds and drain defaults), the backend is a Deployment of podapp whose
// pod also runs `detour hbone-serve` on 15008 with its service account's certificate from
// istiod's CA (the pod's inbound HBONE, as its ztunnel would terminate it). The load goes from
// the test process through a ztunnel stand-in: each request a new HBONE stream to one of the
// waypoint's endpoints picked at random from istiod's workload xDS (WorkloadView.WaypointEndpoints:
// healthy pods only, as ztunnel's load_balance), over connections pooled per endpoint by
// hbone.Dialer, which drops a connection on GOAWAY and dials a new one for the next stream (ztunnel
// src/proxy/pool.rs: a connection not ready_to_use after a GOAWAY is dropped from the pool). One
// detour pod is deleted through the API with its normal grace period; no test tells the
// stand-in. Every request is recorded on one sequence of events (no clocks) with the pod that
// carried it: in flight on the deleted pod means carried by it, started before the pod was gone
// and not finished when it was deleted. Not one request outside those fails; the in-flight ones
// are counted and reported (and their failures).
func TestWaypointPodDeleted(t *testing.T) {
	skipUnlessNode(t)
	build, cancelBuild := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancelBuild()
	dir := t.TempDir()
	pause, app, err := image.NodeImages(build, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	ref, detourTar := detourImage(t, build)
	archives := writeArchives(t, dir, map[string][]byte{"pause.tar": pause, "podapp.tar": app, "detour.tar": detourTar})
	// Start may wait for the test bed's binaries to be built (their own lock); the test's bound
	// starts once the bed runs.
	c := testbed.Start(t, testbed.Options{Istiod: true, Node: &testbed.NodeOptions{Images: archives, SandboxImage: image.PauseRef}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	hboneBackend(t, ctx, c, ns, "app", ref)
	backend := runningPod(t, ctx, c, ns, "app")
	if code, out := detour(ctx, "install", "--kubeconfig", c.Kubeconfig, "-n", ns, "--bind", "namespace", "--image", ref, "--timeout", "3m"); code != 0 {
		t.Fatalf("node: detour install = %d:\n%s", code, out)
	}
	selector := "app.kubernetes.io/name=detour"
	waypoints := waitReadyPods(t, ctx, c, ns, selector, 2)
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, "app", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)

	view, err := c.WatchWorkloads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	route, err := view.WaitRoute(ctx, vip, 2*time.Minute, func(r testbed.Target, ok bool) bool {
		return ok && r.Service != "" && len(view.WaypointEndpoints(vip)) == 2
	})
	if err != nil {
		t.Fatalf("node: %v\n%s", err, view.Describe())
	}
	client, err := c.Workload(ctx, "default", "client")
	if err != nil {
		t.Fatal(err)
	}
	l := &drainLoad{Load: it.NewLoad[drainResult](drainRequests, drainEvery, drainDeleteAt), vip: vip, host: route.Service, view: view, want: backend.Name,
		dials: map[string]int{}, dialsAfterDelete: map[string]int{}}
	l.z = testbed.NewZtunnel(client, l.countDial)
	t.Cleanup(func() { l.z.Close() })

	// Both replicas serve the backend before the load (their discovery has its endpoint).
	for _, ep := range view.WaypointEndpoints(vip) {
		wait(t, ctx, time.Minute, "GET through "+ep.Addr, func() (bool, string) {
			body, err := l.get(ctx, ep)
			return err == nil, fmt.Sprintf("%q %v", body, err)
		})
	}

	victim := waypoints[0]
	victimAddr := net.JoinHostPort(victim.Status.PodIP, "15008")
	logs := followLog(t, ctx, c, ns, victim.Name)
	l.run(ctx, victimAddr)
	<-l.Reached()
	l.Mark(&l.deleteSeq)
	deleted := time.Now()
	if err := c.Client.CoreV1().Pods(ns).Delete(ctx, victim.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait(t, ctx, 2*time.Minute, "the deleted pod gone", func() (bool, string) {
		_, err := c.Client.CoreV1().Pods(ns).Get(ctx, victim.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	l.Mark(&l.goneSeq)
	gone := time.Since(deleted)
	samples := l.Wait()
	t.Logf("node: pod %s (%s) deleted (grace %ds), gone from the API %v later; its log:\n%s", victim.Name, victimAddr,
		*victim.Spec.TerminationGracePeriodSeconds, gone.Round(100*time.Millisecond), logs.String())
	l.check(t, samples, victimAddr)
}

// hboneBackend deploys name in ns: podapp on 8080 and, in the same pod, `detour hbone-serve` on
// 15008 (image ref) with the service account's certificate from istiod's CA (a Secret), which
// terminates the waypoint's onward HBONE and delivers each stream to its target in the pod.
func hboneBackend(t *testing.T, ctx context.Context, c *testbed.Cluster, ns, name, ref string) {
	t.Helper()
	w, err := c.Workload(ctx, ns, name)
	if err != nil {
		t.Fatal(err)
	}
	certs, key, err := w.SVID.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	root := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Istiod.Root.Raw})
	if _, err := c.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name + "-hbone"},
		Data: map[string][]byte{"cert.pem": certs, "key.pem": key, "ca.pem": root}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deploy(t, ctx, c, ns, name, image.PodAppRef, nil, func(s *corev1.PodSpec) {
		s.Containers = append(s.Containers, corev1.Container{
			Name: "hbone", Image: ref, ImagePullPolicy: corev1.PullNever,
			Args:         []string{"hbone-serve", "--listen", "0.0.0.0:15008", "--cert", "/etc/hbone/cert.pem", "--key", "/etc/hbone/key.pem", "--ca", "/etc/hbone/ca.pem"},
			Ports:        []corev1.ContainerPort{{Name: "hbone", ContainerPort: 15008}},
			VolumeMounts: []corev1.VolumeMount{{Name: "hbone", MountPath: "/etc/hbone"}},
		})
		s.Volumes = append(s.Volumes, corev1.Volume{Name: "hbone", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: name + "-hbone"}}})
	})
}

// followLog streams the detour container's log of pod ns/name into the returned buffer until the
// container ends (or the test's context does).
func followLog(t *testing.T, ctx context.Context, c *testbed.Cluster, ns, name string) *syncBuffer {
	t.Helper()
	rc, err := c.Client.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: "detour", Follow: true}).Stream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b := &syncBuffer{done: make(chan struct{})}
	go func() {
		defer close(b.done)
		defer rc.Close()
		io.Copy(b, rc)
	}()
	return b
}

type syncBuffer struct {
	mu   sync.Mutex
	b    bytes.Buffer
	done chan struct{}
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String waits (10 s at most) for the log to end and returns it.
func (b *syncBuffer) String() string {
	select {
	case <-b.done:
	case <-time.After(10 * time.Second):
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// drainLoad sends the load through the stand-in on one sequence of events (it.Load) with the
// deletion and the pod's disappearance.
type drainLoad struct {
	*it.Load[drainResult]
	vip  netip.AddrPort
	host string // the service's hostname (Forwarded host)
	view *testbed.WorkloadView
	want string // the backend's answer: its pod name
	z    *testbed.Ztunnel

	// Under the Load's lock:
	deleteSeq, goneSeq int
	viewSeq            int            // the first request start, after the deletion, whose pick did not offer the deleted pod
	dials              map[string]int // HBONE connections dialed, per waypoint address
	dialsAfterDelete   map[string]int
}

type drainResult struct {
	via string // the waypoint endpoint, IP:15008
	err error
}

// countDial opens the stand-in's HBONE connections, counting them per address.
func (l *drainLoad) countDial(ctx context.Context, network, addr string) (net.Conn, error) {
	l.Locked(func() {
		l.dials[addr]++
		if l.deleteSeq > 0 {
			l.dialsAfterDelete[addr]++
		}
	})
	return (&net.Dialer{}).DialContext(ctx, network, addr)
}

// get sends one GET to the service through the waypoint endpoint ep, on a stream of its own (a
// new connection of the app, as ztunnel sees it), and checks the backend answered.
func (l *drainLoad) get(ctx context.Context, ep testbed.Endpoint) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return l.z.Send(ctx, testbed.Request{Proxy: ep.Addr, ServerID: ep.Identity, Authority: l.vip.String(),
			Source: netip.MustParseAddrPort("127.0.0.1:41234"), Host: l.host})
	}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+l.vip.String()+"/", nil)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 || strings.TrimSpace(string(body)) != l.want {
		return string(body), fmt.Errorf("status %d: %q, want 200 %q", resp.StatusCode, body, l.want)
	}
	return string(body), nil
}

// run sends the load in the background, each request through a waypoint endpoint picked at
// random from the view's healthy ones at its start, as ztunnel picks one per connection.
func (l *drainLoad) run(ctx context.Context, victim string) {
	l.Run(ctx, func(_, start int) func(context.Context) drainResult {
		eps := l.view.WaypointEndpoints(l.vip)
		l.Locked(func() {
			if l.deleteSeq > 0 && l.viewSeq == 0 && !offers(eps, victim) {
				l.viewSeq = start
			}
		})
		if len(eps) == 0 {
			return func(context.Context) drainResult {
				return drainResult{err: fmt.Errorf("no healthy waypoint endpoint in the view")}
			}
		}
		ep := eps[rand.IntN(len(eps))]
		return func(ctx context.Context) drainResult {
			_, err := l.get(ctx, ep)
			return drainResult{via: ep.Addr, err: err}
		}
	})
}

func offers(eps []testbed.Endpoint, addr string) bool {
	for _, e := range eps {
		if e.Addr == addr {
			return true
		}
	}
	return false
}

// check counts the results and asserts on them; victim is the deleted pod's HBONE address.
func (l *drainLoad) check(t *testing.T, samples []it.Sample[drainResult], victim string) {
	t.Helper()
	ta := it.Tally{Counts: map[string]int{}}
	var inflight, inflightFailed, sentAfter, sentAfterFailed int
	for _, sm := range samples {
		r := sm.Result
		phase := "before" // the deletion
		switch {
		case sm.Start > l.goneSeq:
			phase = "after" // the pod was gone
		case sm.Start > l.deleteSeq:
			phase = "drain"
		}
		via := "other"
		if r.via == victim {
			via = "deleted"
		}
		outcome := "ok"
		if r.err != nil {
			outcome = "failed"
		}
		ta.Counts[fmt.Sprintf("%s via %s %s", phase, via, outcome)]++
		// In flight on the deleted pod: carried by it, started before it was gone, not finished
		// when it was deleted.
		if r.via == victim && sm.Start < l.goneSeq && sm.End > l.deleteSeq {
			if sm.Start < l.deleteSeq {
				inflight++
				if r.err != nil {
					inflightFailed++
				}
			} else {
				sentAfter++
				if r.err != nil {
					sentAfterFailed++
				}
			}
			if r.err != nil {
				t.Logf("in flight on the deleted pod, failed: %v", r.err)
			}
			continue
		}
		if r.err != nil {
			ta.Failures = append(ta.Failures, fmt.Sprintf("%s via %s (%s): %v", phase, via, r.via, r.err))
		}
	}
	picked := "never"
	if l.viewSeq > 0 {
		picked = fmt.Sprintf("from sequence %d (deleted at %d, gone at %d)", l.viewSeq, l.deleteSeq, l.goneSeq)
	}
	t.Logf("%d requests; in flight on the deleted pod at its deletion: %d (%d failed); sent to it after the deletion, before the stand-in's view dropped it: %d (%d failed); outside those %d failed; the view stopped offering it %s; HBONE connections dialed after the deletion: %v (all: %v)\n%s",
		len(samples), inflight, inflightFailed, sentAfter, sentAfterFailed, len(ta.Failures), picked, l.dialsAfterDelete, l.dials, ta.Lines(28))
	if len(samples) != drainRequests {
		t.Errorf("%d results, want %d", len(samples), drainRequests)
	}
	ta.Report(t, "not in flight on the deleted pod, failed")
	if ta.Counts["before via deleted ok"] == 0 || ta.Counts["after via other ok"] == 0 {
		t.Errorf("the load did not cover the deletion: %v", ta.Counts)
	}
}
