package devsession

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/quic-go/quic-go.(*Transport).listen"))
}

// Delays double from Initial up to Max, each within its jittered range, and never overflow.
func TestBackoff(t *testing.T) {
	b := Backoff{Initial: 100 * time.Millisecond, Max: 2 * time.Second, Jitter: 0.5}
	for _, tc := range []struct {
		n        int
		r        float64
		want     time.Duration
		wantDesc string
	}{
		{0, 0, 100 * time.Millisecond, "the first, no jitter drawn"},
		{0, 0.999999, 50 * time.Millisecond, "the first, most jitter"},
		{1, 0, 200 * time.Millisecond, "doubled"},
		{4, 0, 1600 * time.Millisecond, "doubled four times"},
		{5, 0, 2 * time.Second, "bounded by Max"},
		{5, 1, time.Second, "bounded, most jitter"},
		{1000, 0, 2 * time.Second, "no overflow"},
		{3, 7, 400 * time.Millisecond, "r clamped to 1"},
	} {
		if got := b.Delay(tc.n, tc.r); got != tc.want && (tc.r < 0.99 || got-tc.want > time.Microsecond) {
			t.Errorf("%s: Delay(%d, %v) = %v, want %v", tc.wantDesc, tc.n, tc.r, got, tc.want)
		}
	}
	var zero Backoff
	if got := zero.Delay(0, 0); got != DefaultBackoff.Initial {
		t.Errorf("the zero Backoff's first delay: %v, want %v", got, DefaultBackoff.Initial)
	}
	if got := zero.Delay(50, 0); got != DefaultBackoff.Max {
		t.Errorf("the zero Backoff's bound: %v, want %v", got, DefaultBackoff.Max)
	}
}

// A Runner whose waypoint never comes back tries with growing delays and gives up once the grace
// period has passed since the tunnel was lost, saying so. (synctest: the clock is the bubble's.)
func TestReconnectGivesUpAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var dials []time.Duration
		start := time.Now()
		r := &Runner{Spec: webSteal, Transport: "h2", Grace: 10 * time.Second, id: "0123456789ab", transport: "h2",
			Rand: func() float64 { return 0 },
			Dial: func(ctx context.Context, transport string, timeout time.Duration) (*tunnel.Tunnel, error) {
				dials = append(dials, time.Since(start))
				return nil, errors.New("connection refused")
			}}
		r.grace = r.Grace
		var notices []Notice
		r.Notify = func(n Notice) { notices = append(notices, n) }
		c, err := r.reconnect(t.Context(), errors.New("idle timeout"))
		if c != nil || err == nil || !strings.HasPrefix(err.Error(), "giving up: no tunnel to the waypoint for 10s") ||
			!strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), "session 0123456789ab ended") {
			t.Fatalf("reconnect: %v %v", c, err)
		}
		if elapsed := time.Since(start); elapsed != 10*time.Second {
			t.Errorf("gave up after %v, want the 10 s grace", elapsed)
		}
		want := []time.Duration{200, 600, 1400, 3000, 6200, 10000} // 200, 400, 800, 1600, 3200, then bounded by the grace
		if fmt.Sprint(dials) != fmt.Sprint(scale(want, time.Millisecond)) {
			t.Errorf("dials at %v, want %v", dials, scale(want, time.Millisecond))
		}
		if len(notices) != 1 || notices[0].Kind != Lost || !strings.Contains(notices[0].String(), "reconnecting for up to 10s to resume session 0123456789ab") {
			t.Errorf("notices: %v", notices)
		}
	})
}

// webSteal is a session's spec.
var webSteal = tunnel.Spec{Namespace: "demo", Service: "web", Port: 80, Mode: tunnel.ModeSteal}

func scale(ds []time.Duration, unit time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d * unit
	}
	return out
}

// A refusal of the resume is final: no more attempts.
func TestReconnectStopsOnRefusal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := 0
		r := &Runner{Spec: webSteal, Transport: "h2", transport: "h2", id: "0123456789ab", grace: time.Minute, Rand: func() float64 { return 0 }}
		r.Dial = func(ctx context.Context, transport string, timeout time.Duration) (*tunnel.Tunnel, error) {
			n++
			return nil, &RefusedError{Reason: "STEAL refused"}
		}
		// register wraps the dial error as is: a RefusedError from the dial stands for the answer.
		_, err := r.reconnect(t.Context(), errLost)
		if err == nil || err.Error() != "the waypoint refused to resume session 0123456789ab: STEAL refused" || n != 1 {
			t.Fatalf("after %d dials: %v", n, err)
		}
	})
}

// The grace the Runner keeps trying for is its own, bounded by what the waypoint keeps the
// session for; a waypoint that cannot resume (an older one) gives none. An egress link alone
// gets the Runner's own.
func TestSessionGrace(t *testing.T) {
	resumable := tunnel.Reply{OK: true, Capabilities: []string{tunnel.CapResume}, GraceSeconds: 20}
	for _, tc := range []struct {
		mine  time.Duration
		reply tunnel.Reply
		want  time.Duration
	}{
		{0, resumable, 20 * time.Second},
		{10 * time.Second, resumable, 10 * time.Second},
		{time.Hour, resumable, 20 * time.Second},
		{-1, resumable, 0},
		{time.Minute, tunnel.Reply{OK: true}, 0},
	} {
		r := &Runner{Spec: webSteal, Grace: tc.mine}
		if got := r.sessionGrace(tc.reply); got != tc.want {
			t.Errorf("grace %v, reply %+v: %v, want %v", tc.mine, tc.reply, got, tc.want)
		}
	}
	// An egress link alone: the waypoint keeps nothing, and any waypoint takes a new link.
	for _, tc := range []struct {
		mine, want time.Duration
	}{{0, DefaultGrace}, {10 * time.Second, 10 * time.Second}, {-1, 0}} {
		r := &Runner{Egress: func(context.Context, net.Conn) {}, Grace: tc.mine}
		if got := r.sessionGrace(tunnel.Reply{OK: true}); got != tc.want {
			t.Errorf("egress only, grace %v: %v, want %v", tc.mine, got, tc.want)
		}
	}
}

// A QUIC dial to a port where UDP gets no answer falls back to HTTP/2 over TCP within
// QUICAnswerTimeout and says why; the session registers over HTTP/2, and a reconnection starts
// with HTTP/2 (the transport that worked).
func TestQUICFallsBackToHTTP2(t *testing.T) {
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	source := func(id string) identity.Source {
		svid, err := ca.Issue(id, time.Time{}, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		return identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()})
	}
	hellos := make(chan tunnel.Hello, 4)
	srv := &tunnel.Server{Identity: source("spiffe://cluster.local/ns/demo/sa/detour"), Logger: slog.New(slog.DiscardHandler),
		Handler: func(p *tunnel.Peer) {
			h, err := tunnel.ReadHello(p.Control())
			if err != nil {
				return
			}
			hellos <- h
			tunnel.WriteMsg(p.Control(), tunnel.Reply{OK: true, Session: "0123456789ab", Protocol: tunnel.Protocol})
			io.Copy(io.Discard, p.Control())
		}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// The same port on UDP, bound and silent: datagrams arrive and nothing answers.
	silent, err := net.ListenPacket("udp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { srv.ServeTCP(ctx, l); close(served) }()
	defer func() { cancel(); <-served }()

	dev := source("spiffe://cluster.local/ns/dev/sa/alice")
	var transports []string
	var notices []Notice
	registered := make(chan struct{})
	r := &Runner{Spec: tunnel.Spec{Namespace: "demo", Service: "web", Port: 80, Mode: tunnel.ModeSteal}, To: "127.0.0.1:1",
		Addr: l.Addr().String(), Transport: "quic", Version: "v-test", Logger: slog.New(slog.DiscardHandler),
		Dial: func(ctx context.Context, transport string, timeout time.Duration) (*tunnel.Tunnel, error) {
			transports = append(transports, transport)
			dctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			return tunnel.Dial(dctx, transport, l.Addr().String(), dev, nil, slog.New(slog.DiscardHandler))
		},
		Notify: func(n Notice) {
			notices = append(notices, n)
			if n.Kind == Registered {
				close(registered)
			}
		}}
	rctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(rctx) }()
	select {
	case <-registered:
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(30 * time.Second): // a hang guard, not the bound under test
		t.Fatal("no registration")
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("UDP to %s got no answer in 3s; using HTTP/2 over TCP (UDP may be blocked)", l.Addr())
	if len(notices) != 2 || notices[0].Kind != FellBack || notices[0].String() != want || notices[1].Transport != "h2" {
		t.Fatalf("notices %v, want the fallback (%q), then the session over h2", notices, want)
	}
	if fmt.Sprint(transports) != "[quic h2]" || r.transport != "h2" {
		t.Fatalf("dials %v, then %s", transports, r.transport)
	}
	h := <-hellos
	if h.Version != "v-test" || h.Protocol != tunnel.Protocol || !h.Has(tunnel.CapResume) || h.Resume != "" || h.GraceSeconds != 0 {
		t.Fatalf("hello %+v", h)
	}
}

// oldHello is the Hello of protocol 1, as an older waypoint decodes it (strictly).
type oldHello struct {
	Register *tunnel.Spec   `json:"register,omitempty"`
	List     bool           `json:"list,omitempty"`
	Egress   bool           `json:"egress,omitempty"`
	AsTarget *tunnel.Target `json:"asTarget,omitempty"`
}

// Against a waypoint older than the version exchange (it closes the tunnel on Hello fields it does
// not know, without an answer), the CLI registers the old way, says so, and will not resume.
func TestOlderWaypoint(t *testing.T) {
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	source := func(id string) identity.Source {
		svid, err := ca.Issue(id, time.Time{}, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		return identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()})
	}
	srv := &tunnel.Server{Identity: source("spiffe://cluster.local/ns/demo/sa/detour"), Logger: slog.New(slog.DiscardHandler),
		Handler: func(p *tunnel.Peer) {
			var h oldHello
			if err := tunnel.ReadMsg(p.Control(), &h); err != nil {
				return // what a protocol-1 waypoint does
			}
			tunnel.WriteMsg(p.Control(), struct {
				OK      bool   `json:"ok"`
				Session string `json:"session"`
			}{true, "0123456789ab"})
			io.Copy(io.Discard, p.Control())
		}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { srv.ServeTCP(ctx, l); close(served) }()
	defer func() { cancel(); <-served }()

	dev := source("spiffe://cluster.local/ns/dev/sa/alice")
	var notices []Notice
	registered := make(chan struct{})
	r := &Runner{Spec: tunnel.Spec{Namespace: "demo", Service: "web", Port: 80, Mode: tunnel.ModeSteal}, To: "127.0.0.1:1",
		Addr: l.Addr().String(), Transport: "h2", Version: "v-new", Logger: slog.New(slog.DiscardHandler),
		Dial: func(ctx context.Context, transport string, timeout time.Duration) (*tunnel.Tunnel, error) {
			dctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			return tunnel.Dial(dctx, transport, l.Addr().String(), dev, nil, slog.New(slog.DiscardHandler))
		},
		Notify: func(n Notice) {
			notices = append(notices, n)
			if n.Kind == Registered {
				close(registered)
			}
		}}
	rctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(rctx) }()
	select {
	case <-registered:
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(30 * time.Second): // a hang guard
		t.Fatal("no registration")
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want := "the waypoint closed the tunnel on this CLI's version exchange (detour v-new, tunnel protocol 2): it runs an older detour; " +
		"registering the old way, and a lost tunnel will end the session"
	if len(notices) != 2 || notices[0].Kind != Legacy || notices[0].String() != want || notices[1].ID != "0123456789ab" {
		t.Fatalf("notices %v, want %q, then the session", notices, want)
	}
	if r.grace != 0 {
		t.Fatalf("a grace of %v against a waypoint that cannot resume", r.grace)
	}
}

// A Runner with an egress link (detour run) gets one per tunnel: after a lost tunnel the
// reconnected one brings the next, and a session rides along resumed under its ID. With no
// session (run without --steal or --mirror) the Runner reconnects for its own grace, since the
// waypoint keeps nothing, and its notices name the egress link.
func TestEgressLinkAcrossTunnels(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spec  tunnel.Spec
		id    string
		lost  string
		back  string
		first string
	}{
		{"egress only", tunnel.Spec{}, "",
			"reconnecting for up to 30s (new connections to the cluster wait for it meanwhile)", "back: the egress link over h2 after ", "the egress link over h2"},
		{"steal", webSteal, "0123456789ab",
			"reconnecting for up to 20s to resume session 0123456789ab", "back: session 0123456789ab resumed over h2 after ", "session 0123456789ab over h2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca, err := devca.New("cluster.local")
			if err != nil {
				t.Fatal(err)
			}
			source := func(id string) identity.Source {
				svid, err := ca.Issue(id, time.Time{}, time.Time{})
				if err != nil {
					t.Fatal(err)
				}
				return identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()})
			}
			hellos := make(chan tunnel.Hello, 4)
			blip := make(chan struct{}) // the test drops the first tunnel
			var tunnels atomic.Int32
			srv := &tunnel.Server{Identity: source("spiffe://cluster.local/ns/demo/sa/detour"), Logger: slog.New(slog.DiscardHandler),
				Handler: func(p *tunnel.Peer) {
					h, err := tunnel.ReadHello(p.Control())
					if err != nil {
						return
					}
					n := tunnels.Add(1)
					hellos <- h
					reply := tunnel.Reply{OK: true} // what the waypoint answers an egress-only Hello
					if h.Register != nil {
						reply = tunnel.Reply{OK: true, Session: "0123456789ab", Protocol: tunnel.Protocol, Capabilities: []string{tunnel.CapResume}, GraceSeconds: 20}
					}
					if tunnel.WriteMsg(p.Control(), reply) != nil {
						return
					}
					c, err := p.Open(context.Background(), tunnel.Meta{Kind: tunnel.KindHBONE})
					if err != nil {
						t.Errorf("tunnel %d: opening the egress link: %v", n, err)
						return
					}
					defer c.Close()
					fmt.Fprintf(c, "link %d", n)
					if n == 1 {
						<-blip
						p.Close()
						return
					}
					io.Copy(io.Discard, p.Control())
				}}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan struct{})
			go func() { srv.ServeTCP(ctx, l); close(served) }()
			defer func() { cancel(); <-served }()

			dev := source("spiffe://cluster.local/ns/dev/sa/alice")
			links := make(chan string, 4)
			notices := make(chan Notice, 8)
			target := &tunnel.Target{Namespace: "demo", Service: "web"}
			r := &Runner{Spec: tc.spec, AsTarget: target, To: "127.0.0.1:1", Addr: l.Addr().String(), Transport: "h2", Version: "v-test",
				Logger: slog.New(slog.DiscardHandler), Rand: func() float64 { return 0 },
				Dial: func(ctx context.Context, transport string, timeout time.Duration) (*tunnel.Tunnel, error) {
					dctx, cancel := context.WithTimeout(ctx, timeout)
					defer cancel()
					return tunnel.Dial(dctx, transport, l.Addr().String(), dev, nil, slog.New(slog.DiscardHandler))
				},
				Egress: func(ctx context.Context, c net.Conn) {
					defer c.Close()
					buf := make([]byte, len("link 1"))
					if _, err := io.ReadFull(c, buf); err != nil {
						t.Errorf("reading the egress link: %v", err)
						return
					}
					links <- string(buf)
					<-ctx.Done() // the link lives as long as its tunnel
				},
				Notify: func(n Notice) { notices <- n }}
			if err := r.Register(ctx); err != nil {
				t.Fatal(err)
			}
			rctx, stop := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- r.Serve(rctx) }()
			next := func(what string) {
				t.Helper()
				select {
				case got := <-links:
					if got != what {
						t.Fatalf("egress link %q, want %q", got, what)
					}
				case err := <-done:
					t.Fatalf("Serve ended: %v", err)
				case <-time.After(30 * time.Second): // a hang guard
					t.Fatalf("no %s", what)
				}
			}
			next("link 1")
			close(blip)
			next("link 2")
			stop()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			close(notices)
			var lines []string
			for n := range notices {
				lines = append(lines, n.String())
			}
			if len(lines) != 3 || lines[0] != tc.first || !strings.Contains(lines[1], tc.lost) || !strings.HasPrefix(lines[2], tc.back) {
				t.Fatalf("notices %q, want %q, then lost (%q), then back (%q)", lines, tc.first, tc.lost, tc.back)
			}
			for i, want := range []string{"", tc.id} {
				h := <-hellos
				if h.Resume != want || !h.Egress || h.AsTarget == nil || *h.AsTarget != *target || (h.Register != nil) != (tc.id != "") {
					t.Errorf("hello %d: %+v, want Resume %q, egress, as target, a registration with the session", i+1, h, want)
				}
			}
		})
	}
}
