package waypoint_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// sessionBed is the echo bed's waypoint with debug sessions, and alice's side of them
// (developers).
type sessionBed struct {
	*bed
	*developers
	reg     *session.Registry
	metrics *metrics.Metrics
}

func newSessionBed(t *testing.T) *sessionBed {
	sb := &sessionBed{reg: &session.Registry{}, metrics: metrics.New(prometheus.NewRegistry())}
	var h *waypoint.Handler
	sb.bed = newBedWith(t, "echo", func(w *waypoint.Handler) { w.Sessions, w.Metrics, h = sb.reg, sb.metrics, w })
	sb.developers = serveDevelopers(t, h, sb.reg, sb.metrics, sb.id(t, "spiffe://cluster.local/ns/dev/sa/alice"))
	return sb
}

// developers is the developers' side of a waypoint's debug sessions: the waypoint's tunnel
// server (QUIC), whose Manager grants alice (cluster.local/ns/dev/sa/alice) STEAL and MIRROR on
// every service behind the Gateway demo/detour, and alice's tunnels and apps.
type developers struct {
	tunnel   string // the QUIC tunnel listener
	alice    identity.Source
	stop     chan struct{} // closed when the test ends, before the developers' tunnels wait for their streams
	stopOnce sync.Once
}

// serveDevelopers serves h's tunnels, registering sessions in reg, until the test ends.
func serveDevelopers(t *testing.T, h *waypoint.Handler, reg *session.Registry, m *metrics.Metrics, alice identity.Source) *developers {
	d := &developers{alice: alice, stop: make(chan struct{})}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{{Namespace: "demo", Name: "alice",
		Spec: &secv1beta1.AuthorizationPolicy{Action: secv1beta1.AuthorizationPolicy_ALLOW,
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
			Rules: []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{"cluster.local/ns/dev/sa/alice"}}}},
				To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"STEAL", "MIRROR"}}}}}}}}})
	mgr := &session.Manager{Registry: reg, Routes: h.Routes, Policies: func() *authz.Engine { return engine },
		Namespace: "demo", Gateway: "detour", Logger: quiet, Metrics: m}
	srv := &tunnel.Server{Identity: h.Identity, Handler: mgr.ServeTunnel, Logger: quiet}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.ServeQUIC(ctx, pc); close(done) }()
	t.Cleanup(func() { cancel(); <-done; pc.Close() })
	d.tunnel = pc.LocalAddr().String()
	return d
}

// developer registers spec as alice through a tunnel to addr and forwards its streams to app
// until the test ends; it returns the session's ID.
func (d *developers) developer(t *testing.T, addr string, spec tunnel.Spec, app string) string {
	t.Helper()
	_, id := d.connect(t, addr, spec, app)
	return id
}

// connect is developer, also returning the tunnel (its control stream is the caller's to read).
func (d *developers) connect(t *testing.T, addr string, spec tunnel.Spec, app string) (*tunnel.Tunnel, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tn, err := tunnel.Dial(ctx, "quic", addr, d.alice, nil, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if err := tunnel.WriteMsg(tn.Control(), tunnel.Hello{Register: &spec}); err != nil {
		t.Fatal(err)
	}
	var r tunnel.Reply
	if err := tunnel.ReadMsg(tn.Control(), &r); err != nil || !r.OK {
		t.Fatalf("registering: %+v %v", r, err)
	}
	fctx, fcancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tn.Forward(fctx, app, nil); close(done) }()
	t.Cleanup(func() { d.stopOnce.Do(func() { close(d.stop) }); fcancel(); tn.Close(); <-done })
	return tn, r.Session
}

// app serves the developer's side: each connection gets serve; done closes when the test ends.
func (d *developers) app(t *testing.T, serve func(c net.Conn, done <-chan struct{})) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	done := d.stop
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				serve(c, done)
			})
		}
	})
	t.Cleanup(func() { d.stopOnce.Do(func() { close(d.stop) }); l.Close(); wg.Wait() })
	return l.Addr().String()
}

func echoApp(c net.Conn, _ <-chan struct{}) {
	io.WriteString(c, "dev ")
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}

// stalledApp accepts and never reads.
func stalledApp(_ net.Conn, done <-chan struct{}) { <-done }

// udpLink carries a QUIC tunnel between the developer and the waypoint over loopback, and can
// vanish at once, as a developer's process killed with -9 does: no close, packets go nowhere.
type udpLink struct {
	pc      net.PacketConn // the developer's side
	up      net.Conn       // to the waypoint
	client  atomic.Pointer[net.Addr]
	gone    atomic.Bool
	dropped atomic.Int64 // packets of the waypoint's that reached no one
	wg      sync.WaitGroup
}

func newUDPLink(t *testing.T, to string) *udpLink {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	up, err := net.Dial("udp", to)
	if err != nil {
		t.Fatal(err)
	}
	l := &udpLink{pc: pc, up: up}
	buf := func() []byte { return make([]byte, 64<<10) }
	l.wg.Go(func() {
		b := buf()
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			l.client.Store(&from)
			if !l.gone.Load() {
				up.Write(b[:n])
			}
		}
	})
	l.wg.Go(func() {
		b := buf()
		for {
			n, err := up.Read(b)
			if err != nil {
				return
			}
			if to := l.client.Load(); to != nil && !l.gone.Load() {
				pc.WriteTo(b[:n], *to)
			} else {
				l.dropped.Add(1)
			}
		}
	})
	t.Cleanup(func() { pc.Close(); up.Close(); l.wg.Wait() })
	return l
}

// A developer whose QUIC tunnel vanishes without a close (kill -9): the next matched stream is
// answered by the real service while the waypoint still counts the tunnel alive (it waited for the
// developer's ack, not for the dead-peer timeout), and the session is gone once the tunnel is
// declared dead.
func TestDeadDeveloperFallsBackBeforeTheTunnelTimesOut(t *testing.T) {
	sb := newSessionBed(t)
	link := newUDPLink(t, sb.tunnel)
	id := sb.developer(t, link.pc.LocalAddr().String(),
		tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Steal}, sb.app(t, echoApp))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // a hang guard
	defer cancel()
	if got, err := sb.roundTrip(ctx, "10.96.0.10:80", "one"); err != nil || got != "dev one" {
		t.Fatalf("stolen stream: %q %v", got, err)
	}
	link.gone.Store(true)
	got, err := sb.roundTrip(ctx, "10.96.0.10:80", "two")
	alive := sb.reg.Get(id) != nil
	if err != nil || !strings.HasPrefix(got, "127.0.0.") || !strings.HasSuffix(got, " two") {
		t.Fatalf("after the developer vanished: %q %v, want the real service's answer", got, err)
	}
	if !alive {
		t.Errorf("the real service answered only once the tunnel was declared dead (%d packets of the waypoint's lost meanwhile): "+
			"the fallback waited for the dead-peer timeout, not for the developer's ack", link.dropped.Load())
	}
	for sb.reg.Get(id) != nil {
		if ctx.Err() != nil {
			t.Fatal("the session outlived its dead tunnel")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got, err := sb.roundTrip(ctx, "10.96.0.10:80", "three"); err != nil || !strings.HasSuffix(got, " three") || strings.HasPrefix(got, "dev") {
		t.Fatalf("after the session ended: %q %v", got, err)
	}
}

// sinkGoroutines counts the goroutines of whole-stream mirror copies (the copy and the reader it
// started), and those parked opening a QUIC stream.
func sinkGoroutines() (sinks, opening int) {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("waypoint.(*mirrorSink).run")) {
			sinks++
		}
		if bytes.Contains(g, []byte("OpenStreamSync")) {
			opening++
		}
	}
	return sinks, opening
}

// Mirrored streams to a developer whose app never reads hold a bounded number of goroutines and
// tunnel streams (per session, and per developer across sessions); every copy past the bound is
// dropped and counted, and the real streams are untouched.
func TestStalledMirrorsAreBounded(t *testing.T) {
	sb := newSessionBed(t)
	stalled := sb.app(t, stalledApp)
	const sessions, conns = 3, 150
	for range sessions {
		sb.developer(t, sb.tunnel, tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Mirror}, stalled)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range conns {
		if got, err := sb.roundTrip(ctx, "10.96.0.10:80", "payload"); err != nil || !strings.HasSuffix(got, " payload") {
			t.Fatalf("connection %d: %q %v", i, got, err)
		}
	}
	sinks, opening := sinkGoroutines()
	dropped := int(testutil.ToFloat64(sb.metrics.Dropped))
	t.Logf("%d mirror goroutines, %d opening streams, %d copies dropped", sinks, opening, dropped)
	if limit := 2 * session.MaxMirrorPerDeveloper; sinks > limit || opening > session.MaxMirrorPerDeveloper {
		t.Errorf("%d mirror goroutines and %d opening a stream for one developer, want at most %d and %d", sinks, opening, limit, session.MaxMirrorPerDeveloper)
	}
	if want := sessions*conns - session.MaxMirrorPerDeveloper; dropped < want {
		t.Errorf("%d copies counted as dropped, want at least %d", dropped, want)
	}
}

// A stream a developer took is counted like any other (the same result record): Istio's TCP
// metrics with the service's labels, bytes both ways, and the session's own count.
func TestStolenStreamCounted(t *testing.T) {
	sb := newSessionBed(t)
	sb.developer(t, sb.tunnel, tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Steal}, sb.app(t, echoApp))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // a hang guard
	defer cancel()
	if got, err := sb.roundTrip(ctx, "10.96.0.10:80", "one"); err != nil || got != "dev one" {
		t.Fatalf("stolen stream: %q %v", got, err)
	}
	m := sb.metrics
	// The waypoint closes its record once its splice has ended, a moment after the client read
	// its answer.
	for testutil.CollectAndCount(m.Closed) == 0 && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	for name, c := range map[string]prometheus.Collector{"opened": m.Opened, "closed": m.Closed} {
		if n := testutil.CollectAndCount(c); n != 1 {
			t.Errorf("istio_tcp_connections_%s_total: %d series, want 1", name, n)
		}
	}
	if got := metrics.Sum(m.Closed, istioStreamLabels("sleep", "echo")); got != 1 {
		t.Errorf("closed with Istio's labels = %v, want 1", got)
	}
	if got := metrics.Sum(m.Received, istioStreamLabels("sleep", "echo")); got != 3 {
		t.Errorf("received bytes = %v, want 3", got)
	}
}
