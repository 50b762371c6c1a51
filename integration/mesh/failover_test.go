package mesh

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"

	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// The failover load: a fixed count of requests at a fixed rate, every other one matched by the
// session's header; killAt is the request whose start triggers the kill.
const (
	failoverRequests = 2400
	failoverEvery    = 5 * time.Millisecond // 200 requests/s: 12 s
	failoverKillAt   = 800                  // 4 s in
)

// Acceptance 3 of issue 19: two `detour waypoint` replicas sharing the test bed (DebugSessions),
// service web bound to them whose endpoint is a network-namespace pod (Istio's Go HBONE server in
// front of an HTTP server answering "real ..."), a developer's `detour steal --header x-dev=alice`
// (the CLI's binary) whose tunnel is on replica A through a front that later reaches B (what the
// detour Service is to the CLI), and a bounded load through the replicas as ztunnel sends it
// (testbed.Ztunnel; each request's replica picked by the client side from the waypoint's ready
// endpoints). Mid-load A is killed (SIGKILL): the CLI resumes the session with the same ID
// through B within the grace period and B takes it over (its DebugSession names B). Every request
// is counted with the replica that carried it, whether it was in flight through A at the kill
// (through A, or through B and relayed to A as the session's holder: started before A died, not
// finished before it was killed), and its outcome. Not one request outside those in flight fails;
// matched requests after the kill and before the resume are answered by the real service; after
// the resume, by the developer through B.
//
// The client side stops choosing A when it is killed: the test plays the endpoint controller at
// once. In a cluster ztunnel keeps choosing a dead pod until its endpoint is removed (connections
// refused meanwhile): Kubernetes' delay, not measured here.
func TestReplicaFailover(t *testing.T) {
	bed := newReplicaBed(t)
	ctx, ns := bed.ctx, bed.ns
	vip := bed.webService(t)
	aAddr, bAddr := freeAddr(t), freeAddr(t)
	a, b := bed.replica(t, aAddr), bed.replica(t, bAddr)
	front := it.NewFront(t, a.Find(t, `tunnel=(127\.0\.0\.1:\d+)`))

	cli := start(t, "steal", "svc/web:80", "-n", ns, "--header", "x-dev=alice", "--to", devHTTP(t), "--waypoint", front.Addr(),
		"--transport", "h2", "--grace", "30s", "--ca", bed.caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice")
	id := cli.Find(t, `session ([0-9a-f]{12}) over h2`)
	b.WaitFor(t, "relaying a session held by another replica")
	holder := bed.sessionHolder(t, id)
	before := holder()

	l := bed.newFailoverLoad(t, vip, aAddr, bAddr)
	for _, via := range []string{aAddr, bAddr} { // the bed works before the load: both answers through both
		for _, matched := range []bool{false, true} {
			want := map[bool]string{false: "real GET /", true: "dev GET /"}[matched]
			if body, err := l.get(ctx, via, matched); err != nil || !strings.HasPrefix(body, want) {
				t.Fatalf("through %s (matched %v): %q %v, want %q...", via, matched, body, err, want)
			}
		}
	}

	l.run(ctx)
	<-l.Reached() // request failoverKillAt started
	front.Point(b.Find(t, `tunnel=(127\.0\.0\.1:\d+)`))
	l.drop(aAddr)
	l.Mark(&l.killSeq)
	a.Process.Kill()
	<-a.Done
	l.Mark(&l.deadSeq)
	killed := time.Now()
	back := cli.Find(t, `back: session ([0-9a-f]{12}) resumed over h2`)
	l.Mark(&l.backSeq)
	resumed := time.Since(killed)
	b.WaitFor(t, "mesh: taking over a session another replica held")
	samples := l.Wait()
	if back != id {
		t.Fatalf("the session came back as %s, want %s", back, id)
	}
	t.Logf("session %s: CLI back through B %v after A was killed (grace 30s)", id, resumed.Round(100*time.Millisecond))
	l.check(t, samples, aAddr, bAddr)

	// The session carries on through B.
	for i := range 20 {
		if body, err := l.get(ctx, bAddr, true); err != nil || !strings.HasPrefix(body, "dev ") {
			t.Fatalf("matched request %d through B after the load: %q %v", i, body, err)
		}
	}
	if after := holder(); after == before || after == "" {
		t.Fatalf("the DebugSession names replica %q after the take-over, %q before", after, before)
	}
}

// webService creates service web (HTTP 80 -> 8080) bound to detour, its pod web-0 (service
// account web) in a network namespace the replicas reach (Network.Node) serving "real METHOD
// PATH" behind Istio's Go HBONE server with web's identity from the bed's CA, and its ready
// EndpointSlice naming the pod (there is no endpoint controller). It returns VIP:80.
func (b *replicaBed) webService(t *testing.T) string {
	t.Helper()
	b.net.Node(t)
	pod := b.net.Pod(t, b.c, b.ns, "web-0", "web")
	svid, err := b.ca.Issue("spiffe://cluster.local/ns/shop/sa/web", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	pod.RunIstioHBONE(t, &testbed.Workload{Namespace: b.ns, ServiceAccount: "web", SVID: svid, Bundle: b.ca.Bundle()})
	pod.Run(t, pod.IP+":8080", "http", pod.IP+":8080", "real")
	svc, err := b.c.Client.CoreV1().Services(b.ns).Create(b.ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: b.ns, Labels: map[string]string{mesh.UseWaypoint: "detour"}},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web-0"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ready, name, port, tcp := true, "http", int32(8080), corev1.ProtocolTCP
	if _, err := b.c.Client.DiscoveryV1().EndpointSlices(b.ns).Create(b.ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-testbed", Namespace: b.ns, Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{pod.IP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: b.ns, Name: pod.Name}}},
		Ports: []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &tcp}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort(svc.Spec.ClusterIP, "80")
}

// sessionHolder returns a function reading the replica the session's DebugSession names.
func (b *replicaBed) sessionHolder(t *testing.T, id string) func() string {
	dyn, err := dynamic.NewForConfig(b.c.REST)
	if err != nil {
		t.Fatal(err)
	}
	return func() string {
		t.Helper()
		obj, err := dyn.Resource(mesh.GVRDebugSession).Namespace(b.ns).Get(b.ctx, id, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("DebugSession %s: %v", id, err)
		}
		r, _, _ := unstructured.NestedString(obj.Object, "spec", "replica")
		return r
	}
}

// devHTTP is the developer's app: it answers "dev METHOD PATH".
func devHTTP(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "dev %s %s", r.Method, r.URL.Path)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// failoverLoad sends the failover load through the replicas with a ztunnel stand-in, on one
// sequence of events (it.Load) with the kill.
type failoverLoad struct {
	*it.Load[failoverResult]
	vip string
	z   *testbed.Ztunnel

	// Under the Load's lock:
	pool                      []string // the waypoint's ready endpoints the client side picks from
	killSeq, deadSeq, backSeq int
}

type failoverResult struct {
	via     string
	matched bool
	body    string
	err     error
}

func (b *replicaBed) newFailoverLoad(t *testing.T, vip string, replicas ...string) *failoverLoad {
	svid, err := b.ca.Issue("spiffe://cluster.local/ns/default/sa/client", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	z := testbed.NewZtunnel(&testbed.Workload{Namespace: "default", ServiceAccount: "client", SVID: svid, Bundle: b.ca.Bundle()}, nil)
	t.Cleanup(func() { z.Close() })
	return &failoverLoad{Load: it.NewLoad[failoverResult](failoverRequests, failoverEvery, failoverKillAt), vip: vip, z: z, pool: replicas}
}

// get sends one GET to web through the replica at via on a stream of its own and returns the
// body of a 200.
func (l *failoverLoad) get(ctx context.Context, via string, matched bool) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return l.z.Dial(ctx, via, "spiffe://cluster.local/ns/shop/sa/detour", l.vip, netip.MustParseAddrPort("127.0.0.1:41234"))
	}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+l.vip+"/", nil)
	if matched {
		req.Header.Set("X-Dev", "alice")
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("status %d: %s", resp.StatusCode, body)
	}
	return string(body), err
}

// run sends the load in the background: request i is matched when i is even, and goes to the
// replica the client side picks then (round robin over pairs, so each replica gets both kinds).
func (l *failoverLoad) run(ctx context.Context) {
	l.Run(ctx, func(i, _ int) func(context.Context) failoverResult {
		matched := i%2 == 0
		var via string
		l.Locked(func() { via = l.pool[(i/2)%len(l.pool)] })
		return func(ctx context.Context) failoverResult {
			body, err := l.get(ctx, via, matched)
			return failoverResult{via: via, matched: matched, body: body, err: err}
		}
	})
}

// drop removes a replica from the ones the client side picks.
func (l *failoverLoad) drop(addr string) {
	l.Locked(func() {
		l.pool = slices.DeleteFunc(l.pool, func(p string) bool { return p == addr })
	})
}

// check counts the results and asserts on them; killed is the killed replica's address, other
// the one that took over.
func (l *failoverLoad) check(t *testing.T, samples []it.Sample[failoverResult], killed, other string) {
	t.Helper()
	name := map[string]string{killed: "A", other: "B"}
	ta := it.Tally{Counts: map[string]int{}}
	var inflight, inflightRelayed, inflightFailed int
	for _, sm := range samples {
		r := sm.Result
		// In flight through the killed replica: started before it died and not finished when it
		// was killed, carried by it (sent to it, or a matched request relayed to it by B while it
		// held the session).
		inFlight := sm.Start < l.deadSeq && sm.End > l.killSeq && (r.via == killed || r.matched)
		phase := "before" // the kill
		switch {
		case sm.Start > l.backSeq:
			phase = "after" // the CLI said it was back
		case sm.Start > l.deadSeq:
			phase = "outage"
		case sm.Start > l.killSeq:
			phase = "kill"
		}
		kind := map[bool]string{true: "matched", false: "unmatched"}[r.matched]
		outcome := "failed"
		switch {
		case r.err != nil:
		case strings.HasPrefix(r.body, "dev "):
			outcome = "dev"
		case strings.HasPrefix(r.body, "real "):
			outcome = "real"
		default:
			outcome = "odd"
		}
		ta.Counts[fmt.Sprintf("%s %s %s via %s", phase, kind, outcome, name[r.via])]++
		if inFlight {
			inflight++
			if r.via != killed {
				inflightRelayed++
			}
			if outcome == "failed" {
				inflightFailed++
				t.Logf("in flight through A at the kill, failed: %s via %s: %v", kind, name[r.via], r.err)
			}
			continue
		}
		want := map[string]map[bool]string{"before": {true: "dev", false: "real"}, "after": {true: "dev", false: "real"}}[phase][r.matched]
		switch {
		case outcome == "failed" || outcome == "odd":
			ta.Failures = append(ta.Failures, fmt.Sprintf("%s %s via %s: %q %v", phase, kind, name[r.via], r.body, r.err))
		case want != "" && outcome != want:
			ta.Failures = append(ta.Failures, fmt.Sprintf("%s %s via %s answered by %s, want %s", phase, kind, name[r.via], outcome, want))
		case !r.matched && outcome != "real":
			ta.Failures = append(ta.Failures, fmt.Sprintf("%s %s via %s answered by %s", phase, kind, name[r.via], outcome))
		}
	}
	t.Logf("%d requests; in flight through A at the kill: %d (%d of them through B, relayed to A), %d of those failed; outside them %d failed or misrouted:\n%s",
		len(samples), inflight, inflightRelayed, inflightFailed, len(ta.Failures), ta.Lines(32))
	if len(samples) != failoverRequests {
		t.Errorf("%d results, want %d", len(samples), failoverRequests)
	}
	ta.Report(t, "not in flight through A")
	for _, k := range []string{"before matched dev via A", "before matched dev via B", "outage matched real via B", "after matched dev via B", "after unmatched real via B"} {
		if ta.Counts[k] == 0 {
			t.Errorf("no %q requests: the load did not cover the failover", k)
		}
	}
}
