package mesh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/util/retry"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// The shift loads: a fixed count at a fixed rate, the route updated on the API server when
// request (or connection) at has started.
const (
	shiftRequests = 1500
	shiftEvery    = 5 * time.Millisecond // 200 requests/s: 7.5 s
	shiftAt       = 500                  // 2.5 s in
	shiftConns    = 600
	shiftConnEach = 10 * time.Millisecond // 100 connections/s: 6 s
	shiftConnAt   = 200                   // 2 s in
)

// Issue 17, acceptance 4 (first half) with real requests: detour's waypoint (in this process, so
// -race covers it: mesh.Discovery on the test bed's kube-apiserver, waypoint.Handler behind an
// hbone.Server, wired as `detour waypoint` wires them) serves service reviews, whose pods are
// reviews-v1-0 and reviews-v2-0 (network-namespace pods, Istio's Go HBONE server with each
// version's identity from istiod's CA in front of an HTTP server and an echo that answer with the
// version's name); Services reviews-v1 and reviews-v2 select one pod each. A ztunnel stand-in
// sends a bounded load through the waypoint while a route on reviews is changed on the API
// server from weights 100/0 to 0/100: an HTTPRoute under HTTP requests (half on a stream of
// their own, half on kept-alive connections, which must be routed per request), then a TCPRoute
// under TCP connections (per connection, byte-exact echo). Every request is classified on one
// sequence of events with the update's write and the waypoint's route table taking it (no
// clocks): not one fails; none that ended before the write went to v2; every one started after
// the waypoint took the route went to v2. The times from the update's return to the table
// taking it, to the first request at v2 and to the last at v1 are logged, never asserted.
func TestRouteWeightShift(t *testing.T) {
	b := newShiftBed(t)
	b.httpShift(t)
	b.tcpShift(t)
}

// shiftBed is the test bed of TestRouteWeightShift.
type shiftBed struct {
	ctx  context.Context
	ns   string
	gc   gwclient.Interface
	d    *mesh.Discovery
	wp   string // the waypoint's HBONE address
	wpID string
	vip  string // reviews' ClusterIP
	z    *testbed.Ztunnel
}

func newShiftBed(t *testing.T) *shiftBed {
	t.Helper()
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	b := &shiftBed{ctx: ctx, ns: "shift"}
	if err := c.Namespace(ctx, b.ns, nil); err != nil {
		t.Fatal(err)
	}
	n := testbed.NewNetwork(t)
	n.Node(t) // the waypoint, in the root namespace, reaches the pods
	var pods []*testbed.Pod
	for _, v := range []string{"reviews-v1", "reviews-v2"} {
		pod := versionPod(t, c, n, b.ns, v)
		pods = append(pods, pod)
		b.service(t, c, v, pod)
	}
	b.vip = b.service(t, c, "reviews", pods...) // bookinfo's reviews: every version
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	if b.gc, err = gwclient.NewForConfig(c.REST); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"http", "tcp"} {
		b.createRoute(t, r)
	}
	b.d = &mesh.Discovery{Kube: c.Client, Istio: ic, Gateway: b.gc, Waypoint: authz.Waypoint{Namespace: b.ns, Gateway: "detour"}}
	runDiscovery(ctx, t, b.d)
	b.serveWaypoint(t, c)
	client, err := c.Workload(ctx, "default", "client")
	if err != nil {
		t.Fatal(err)
	}
	b.z = testbed.NewZtunnel(client, nil)
	t.Cleanup(func() { b.z.Close() })
	return b
}

// versionPod is pod VERSION-0 (service account VERSION) behind Istio's Go HBONE server with its
// identity from istiod's CA, serving HTTP on 8080 ("VERSION METHOD PATH") and an echo on 5432
// that first writes "VERSION\n".
func versionPod(t *testing.T, c *testbed.Cluster, n *testbed.Network, ns, version string) *testbed.Pod {
	t.Helper()
	w, err := c.Workload(context.Background(), ns, version)
	if err != nil {
		t.Fatal(err)
	}
	pod := n.Pod(t, c, ns, version+"-0", version)
	pod.RunIstioHBONE(t, w)
	pod.Run(t, pod.IP+":8080", "http", pod.IP+":8080", version)
	pod.Run(t, pod.IP+":5432", "echo", pod.IP+":5432", version)
	return pod
}

// service creates Service name bound to detour (http 80 -> 8080, tcp 5432) and its ready
// EndpointSlice naming pods (there is no endpoint controller), and returns its ClusterIP.
func (b *shiftBed) service(t *testing.T, c *testbed.Cluster, name string, pods ...*testbed.Pod) string {
	t.Helper()
	svc, err := c.Client.CoreV1().Services(b.ns).Create(b.ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: b.ns, Labels: map[string]string{mesh.UseWaypoint: "detour"}},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP},
			{Name: "tcp", Port: 5432, TargetPort: intstr.FromInt32(5432), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ready, tcp := true, corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-testbed", Namespace: b.ns, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: &tcp}, {Name: ptr("tcp"), Port: ptr(int32(5432)), Protocol: &tcp}},
	}
	for _, p := range pods {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{p.IP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: b.ns, Name: p.Name}})
	}
	if _, err := c.Client.DiscoveryV1().EndpointSlices(b.ns).Create(b.ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return svc.Spec.ClusterIP
}

// serveWaypoint serves detour's waypoint handler for shift/detour (identity from istiod's CA)
// over HBONE on a loopback port, with discovery's tables, as `detour waypoint` wires them.
func (b *shiftBed) serveWaypoint(t *testing.T, c *testbed.Cluster) {
	t.Helper()
	w, err := c.Workload(b.ctx, b.ns, "detour")
	if err != nil {
		t.Fatal(err)
	}
	b.wpID = w.SVID.ID.String()
	src := identity.Static(&identity.Identity{SVID: w.SVID, Bundle: w.Bundle})
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	onward := &hbone.Dialer{Logger: log}
	h := &waypoint.Handler{Routes: b.d.Routes, Balancer: &route.Balancer{}, Identity: src, Dialer: onward,
		Policies: b.d.Policies, Authn: b.d.Authn, HTTPRoutes: b.d.HTTPRoutes, L4Routes: b.d.L4Routes, Logger: log}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.wp = l.Addr().String()
	srv := &hbone.Server{Handler: h, TLSConfig: identity.ServerTLS(src, nil), Logger: log}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			t.Errorf("waypoint Serve: %v", err)
		}
		onward.Close()
	})
}

// The routes on reviews: HTTPRoute "split" on port 80 and TCPRoute "split" on port 5432, both
// 100/0 to reviews-v1/reviews-v2 until shifted.
func (b *shiftBed) createRoute(t *testing.T, kind string) {
	t.Helper()
	var err error
	if kind == "http" {
		_, err = b.gc.GatewayV1().HTTPRoutes(b.ns).Create(b.ctx, &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: "split", Namespace: b.ns},
			Spec: gwv1.HTTPRouteSpec{CommonRouteSpec: reviewsParent(80), Rules: []gwv1.HTTPRouteRule{{BackendRefs: httpWeights(100, 0)}}}}, metav1.CreateOptions{})
	} else {
		_, err = b.gc.GatewayV1().TCPRoutes(b.ns).Create(b.ctx, &gwv1.TCPRoute{ObjectMeta: metav1.ObjectMeta{Name: "split", Namespace: b.ns},
			Spec: gwv1.TCPRouteSpec{CommonRouteSpec: reviewsParent(5432), Rules: []gwv1.TCPRouteRule{{BackendRefs: tcpWeights(100, 0)}}}}, metav1.CreateOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
}

func reviewsParent(port gwv1.PortNumber) gwv1.CommonRouteSpec {
	return gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr(gwv1.Group("")), Kind: ptr(gwv1.Kind("Service")), Name: "reviews", Port: &port}}}
}

func tcpWeights(v1, v2 int32) []gwv1.BackendRef {
	ref := func(name string, w int32) gwv1.BackendRef {
		return gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: ptr(gwv1.PortNumber(5432))}, Weight: &w}
	}
	return []gwv1.BackendRef{ref("reviews-v1", v1), ref("reviews-v2", v2)}
}

func httpWeights(v1, v2 int32) []gwv1.HTTPBackendRef {
	var out []gwv1.HTTPBackendRef
	for _, r := range tcpWeights(v1, v2) {
		r.Port = ptr(gwv1.PortNumber(80))
		out = append(out, gwv1.HTTPBackendRef{BackendRef: r})
	}
	return out
}

// shiftLoad is a load on one sequence of events with the route's update: writing and written
// bracket the Update call on the API server, taken is when the waypoint's table routes to v2.
type shiftLoad struct {
	*it.Load[shiftResult]
	writing, written, taken int // under the Load's lock
}

// shiftResult is one request or connection: the version that answered ("" when it failed).
type shiftResult struct {
	started time.Time // for the logged times only
	kept    bool      // an HTTP request on a kept-alive connection
	version string
	err     error
}

// httpShift sends the HTTP load and moves HTTPRoute split from 100/0 to 0/100 under it.
func (b *shiftBed) httpShift(t *testing.T) {
	var keptDials atomic.Int64
	fresh := b.transport(true, nil)
	kept := b.transport(false, &keptDials)
	defer kept.CloseIdleConnections()
	for _, tr := range []*http.Transport{fresh, kept} { // the bed works before the load
		if r := b.get(tr); r.err != nil || r.version != "reviews-v1" {
			t.Fatalf("before the load: %q %v, want reviews-v1", r.version, r.err)
		}
	}
	l := &shiftLoad{Load: it.NewLoad[shiftResult](shiftRequests, shiftEvery, shiftAt)}
	l.Run(b.ctx, func(i, _ int) func(context.Context) shiftResult {
		tr, started := fresh, time.Now()
		if i%2 == 1 {
			tr = kept
		}
		return func(context.Context) shiftResult {
			r := b.get(tr)
			r.started, r.kept = started, tr == kept
			return r
		}
	})
	takes := func() bool { return b.httpBackend() == "reviews-v2" }
	updated := b.shift(t, l, takes, func(ctx context.Context) error {
		hr, err := b.gc.GatewayV1().HTTPRoutes(b.ns).Get(ctx, "split", metav1.GetOptions{})
		if err != nil {
			return err
		}
		hr.Spec.Rules[0].BackendRefs = httpWeights(0, 100)
		_, err = b.gc.GatewayV1().HTTPRoutes(b.ns).Update(ctx, hr, metav1.UpdateOptions{})
		return err
	})
	l.check(t, "HTTPRoute", "requests", l.Wait(), shiftRequests, updated)
	t.Logf("HTTPRoute: the %d kept-alive requests (and 1 before the load) went over %d connections", shiftRequests/2, keptDials.Load())
}

// tcpShift sends the TCP load and moves TCPRoute split from 100/0 to 0/100 under it.
func (b *shiftBed) tcpShift(t *testing.T) {
	if r := b.echo(0); r.err != nil || r.version != "reviews-v1" {
		t.Fatalf("before the load: %q %v, want reviews-v1", r.version, r.err)
	}
	l := &shiftLoad{Load: it.NewLoad[shiftResult](shiftConns, shiftConnEach, shiftConnAt)}
	l.Run(b.ctx, func(i, _ int) func(context.Context) shiftResult {
		started := time.Now()
		return func(context.Context) shiftResult {
			r := b.echo(i)
			r.started = started
			return r
		}
	})
	takes := func() bool { return b.l4Backend() == "reviews-v2" }
	updated := b.shift(t, l, takes, func(ctx context.Context) error {
		tr, err := b.gc.GatewayV1().TCPRoutes(b.ns).Get(ctx, "split", metav1.GetOptions{})
		if err != nil {
			return err
		}
		tr.Spec.Rules[0].BackendRefs = tcpWeights(0, 100)
		_, err = b.gc.GatewayV1().TCPRoutes(b.ns).Update(ctx, tr, metav1.UpdateOptions{})
		return err
	})
	l.check(t, "TCPRoute", "connections", l.Wait(), shiftConns, updated)
}

// shift waits for the load's request At, updates the route on the API server (update, retried
// on a conflict with istiod's status writes), marks the write on the load's sequence, then
// waits until the waypoint's table takes it (a hang guard of 5 s) and marks that. It returns
// when the update returned.
func (b *shiftBed) shift(t *testing.T, l *shiftLoad, takes func() bool, update func(context.Context) error) time.Time {
	t.Helper()
	select {
	case <-l.Reached():
	case <-b.ctx.Done():
		t.Fatal("the load never reached its update")
	}
	if takes() {
		t.Fatal("the waypoint routes to reviews-v2 before the update")
	}
	l.Mark(&l.writing)
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error { return update(b.ctx) }); err != nil {
		t.Fatal(err)
	}
	updated := time.Now()
	l.Mark(&l.written)
	for !takes() {
		if time.Since(updated) > 5*time.Second { // a hang guard, not the claim
			l.Wait()
			t.Fatal("the waypoint never took the update")
		}
		time.Sleep(time.Millisecond)
	}
	l.Mark(&l.taken)
	t.Logf("the waypoint's route table took the update %v after it returned", time.Since(updated).Round(time.Millisecond))
	return updated
}

// check classifies every sample against the update's write and the waypoint taking it.
func (l *shiftLoad) check(t *testing.T, kind, noun string, samples []it.Sample[shiftResult], want int, updated time.Time) {
	t.Helper()
	ta := it.Tally{Counts: map[string]int{}}
	var firstV2, lastV1 *time.Duration // from the update's return to the request's start
	for _, sm := range samples {
		r := sm.Result
		phase := "during" // the update: either version is right
		switch {
		case sm.End < l.writing:
			phase = "before"
		case sm.Start > l.taken:
			phase = "after"
		}
		conn := map[bool]string{true: "kept", false: "fresh"}[r.kept]
		outcome := r.version
		if r.err != nil {
			outcome = "failed"
		}
		ta.Counts[fmt.Sprintf("%s %s %s", phase, conn, outcome)]++
		switch {
		case r.err != nil:
			ta.Failures = append(ta.Failures, fmt.Sprintf("%s %s: %v", phase, conn, r.err))
		case phase == "before" && r.version != "reviews-v1":
			ta.Failures = append(ta.Failures, fmt.Sprintf("ended before the update was written, answered by %s", r.version))
		case phase == "after" && r.version != "reviews-v2":
			ta.Failures = append(ta.Failures, fmt.Sprintf("%s, started after the waypoint took the update, answered by %s", conn, r.version))
		}
		at := r.started.Sub(updated)
		if r.version == "reviews-v2" && (firstV2 == nil || at < *firstV2) {
			firstV2 = &at
		}
		if r.version == "reviews-v1" && (lastV1 == nil || at > *lastV1) {
			lastV1 = &at
		}
	}
	t.Logf("%s: %d %s; from the update's return: first started at v2 %v, last started at v1 %v; %d failed or misrouted:\n%s",
		kind, len(samples), noun, since(firstV2), since(lastV1), len(ta.Failures), ta.Lines(24))
	if len(samples) != want {
		t.Errorf("%s: %d results, want %d", kind, len(samples), want)
	}
	ta.Report(t, kind)
	for _, k := range []string{"before", "after"} {
		n := 0
		for c, v := range ta.Counts {
			if strings.HasPrefix(c, k+" ") {
				n += v
			}
		}
		if n == 0 {
			t.Errorf("%s: no request %s the update: the load did not cover it", kind, k)
		}
	}
}

// since prints a logged time, "none" when nil.
func since(d *time.Duration) string {
	if d == nil {
		return "none"
	}
	return d.Round(time.Millisecond).String()
}

// transport sends HTTP to reviews through the waypoint, each connection an HBONE stream as
// ztunnel opens one per client connection; fresh: one connection per request. dials, if set,
// counts the connections.
func (b *shiftBed) transport(fresh bool, dials *atomic.Int64) *http.Transport {
	return &http.Transport{DisableKeepAlives: fresh, MaxIdleConnsPerHost: 16, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		if dials != nil {
			dials.Add(1)
		}
		return b.z.Dial(ctx, b.wp, b.wpID, net.JoinHostPort(b.vip, "80"), netip.MustParseAddrPort("127.0.0.1:41234"))
	}}
}

// get sends GET / to reviews and returns the version whose answer is exactly "VERSION GET /".
func (b *shiftBed) get(tr *http.Transport) shiftResult {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+net.JoinHostPort(b.vip, "80")+"/", nil)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return shiftResult{err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	version, ok := strings.CutSuffix(string(body), " GET /")
	switch {
	case err != nil:
	case resp.StatusCode != 200:
		err = fmt.Errorf("status %d: %q", resp.StatusCode, body)
	case !ok || (version != "reviews-v1" && version != "reviews-v2"):
		err = fmt.Errorf("answer %q", body)
	}
	if err != nil {
		return shiftResult{err: err}
	}
	return shiftResult{version: version}
}

// echo opens connection i to reviews:5432 through the waypoint, sends a payload of its own,
// half-closes, and returns the version whose greeting came back followed by exactly the payload.
func (b *shiftBed) echo(i int) shiftResult {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	s, err := b.z.Dial(ctx, b.wp, b.wpID, net.JoinHostPort(b.vip, "5432"), netip.MustParseAddrPort("127.0.0.1:41235"))
	if err != nil {
		return shiftResult{err: err}
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(10 * time.Second))
	payload := bytes.Repeat(fmt.Appendf(nil, "connection %d;", i), 256)
	if _, err := s.Write(payload); err != nil {
		return shiftResult{err: fmt.Errorf("writing: %w", err)}
	}
	if err := s.CloseWrite(); err != nil {
		return shiftResult{err: fmt.Errorf("half-closing: %w", err)}
	}
	got, err := io.ReadAll(s)
	if err != nil {
		return shiftResult{err: fmt.Errorf("reading: %w (%d bytes)", err, len(got))}
	}
	version, rest, _ := bytes.Cut(got, []byte("\n"))
	if v := string(version); (v != "reviews-v1" && v != "reviews-v2") || !bytes.Equal(rest, payload) {
		return shiftResult{err: fmt.Errorf("echo of %d bytes: got %d bytes starting %q", len(payload), len(got), got[:min(len(got), 40)])}
	}
	return shiftResult{version: string(version)}
}

// httpBackend is the backend the waypoint's HTTP route table picks for GET / to reviews:80
// (weights 100/0 or 0/100 make the draw irrelevant).
func (b *shiftBed) httpBackend() string {
	m, attached := b.d.HTTPRoutes().Match(b.ns, "reviews", 80, httptest.NewRequest("GET", "/", nil), "/", false)
	if !attached || m.Rule == nil {
		return ""
	}
	if be := m.Rule.Pick(func(n int) int { return n / 2 }); be != nil {
		return be.Name
	}
	return ""
}

// l4Backend is the backend the waypoint's L4 route table picks for a TCP connection to
// reviews:5432.
func (b *shiftBed) l4Backend() string {
	rule := b.d.L4Routes().For(b.ns, "reviews", 5432).Match(false, "")
	if rule == nil {
		return ""
	}
	if be := rule.Pick(func(n int) int { return n / 2 }); be != nil {
		return be.Name
	}
	return ""
}
