// Package devsession is the developer's end of a debug session (`detour steal|mirror`): it
// registers the session through a tunnel, connects the waypoint's data streams to the
// developer's app, and when the tunnel is lost reconnects, with a bounded, jittered exponential
// backoff, to whatever the waypoint's address now reaches (the same replica after a blip,
// another one after a restart) and re-registers the same session (its ID, filter and binding)
// within the session's grace period. A QUIC tunnel that gets no answer falls back to HTTP/2 over
// TCP on its own, and reconnections use the transport that worked. A Runner may also carry the
// developer's egress link (`detour run`): each tunnel, the first and every reconnected one, gets
// its own, and a Runner with no session (a zero Spec) carries only that.
package devsession

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"time"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Timeouts of a registration.
const (
	// QUICAnswerTimeout: a QUIC dial that gets no answer this long falls back to HTTP/2 over TCP,
	// which leaves the fallback well within 5 s (a TCP connection and a TLS handshake more).
	QUICAnswerTimeout = 3 * time.Second
	// DialTimeout bounds any other dial, and the Hello's answer.
	DialTimeout = 15 * time.Second
	// hangUpWait bounds the wait for the waypoint to close the tunnel after the CLI ended the
	// session (its half-close of the control stream).
	hangUpWait = time.Second
)

// DefaultGrace is how long a Runner tries to get its session back (Runner.Grace); the waypoint
// may keep it for less (its own grace).
const DefaultGrace = 30 * time.Second

// Dialer opens a tunnel to the waypoint over transport (quic or h2), its setup bounded by
// timeout; what it starts besides the tunnel (a port-forward) may live until ctx ends, which
// the Runner ends once it is done with the tunnel.
type Dialer func(ctx context.Context, transport string, timeout time.Duration) (*tunnel.Tunnel, error)

// Runner runs one session until its ctx ends (nil error), the waypoint refuses or ends it, or its
// tunnel stays lost past the grace period.
type Runner struct {
	Spec tunnel.Spec // the session; zero (no Service): none, the tunnel carries the egress link only
	// Egress, if set, asks for the egress link and serves each one the waypoint opens (one per
	// tunnel) until its ctx ends with that tunnel. AsTarget: the link's connections carry that
	// service's workload identity (an IMPERSONATE grant).
	Egress    func(ctx context.Context, c net.Conn)
	AsTarget  *tunnel.Target
	To        string // the developer's app, host:port
	Addr      string // the waypoint's address, for messages
	Transport string // quic (falls back to h2 when UDP gets no answer) or h2
	Dial      Dialer
	// Grace is how long after a lost tunnel the Runner tries to re-register the session (at
	// most what the waypoint keeps it); 0 means DefaultGrace, negative: never (the session ends
	// with its tunnel).
	Grace   time.Duration
	Version string  // this CLI's detour version, for the version exchange
	Backoff Backoff // zero: DefaultBackoff

	Notify func(Notice)                   // nil: nothing is said
	Event  func(tunnel.Event)             // each stolen or mirrored request or stream; nil: ignored
	Seen   func(m tunnel.Meta, err error) // each stream to the app and how its connection went
	Rand   func() float64                 // the backoff's jitter; nil means math/rand/v2
	Logger *slog.Logger                   // nil means slog.Default()

	// owned by Run
	id        string
	transport string
	grace     time.Duration // the session's: Grace bounded by the waypoint's answer
	legacy    bool          // the waypoint predates the version exchange
	first     *conn         // the registered tunnel, from Register to Serve
}

// Run registers the session and serves it (see Runner).
func (r *Runner) Run(ctx context.Context) error {
	if err := r.Register(ctx); err != nil {
		return err
	}
	return r.Serve(ctx)
}

// Register dials and registers the session: Run's first step, for a caller that goes on only
// once the session is up (detour run starts CMD then). Serve must follow.
func (r *Runner) Register(ctx context.Context) error {
	if r.Dial == nil {
		return errors.New("devsession: no Dialer")
	}
	r.transport = r.Transport
	c, reply, err := r.register(ctx, "", DialTimeout)
	if err != nil {
		return err
	}
	r.id, r.first = reply.Session, c
	r.notify(Notice{Kind: Registered, ID: r.id, Transport: r.transport})
	return nil
}

// Serve serves the session Register registered, across tunnels, until ctx ends (nil), the
// waypoint refuses or ends it, or its tunnel stays lost past the grace period.
func (r *Runner) Serve(ctx context.Context) error {
	c := r.first
	if c == nil {
		return errors.New("devsession: Serve before Register")
	}
	r.first = nil
	for {
		err := r.serve(ctx, c)
		c.close()
		if ctx.Err() != nil {
			return nil
		}
		var ended *EndedError
		if errors.As(err, &ended) {
			return err
		}
		if r.grace <= 0 {
			return fmt.Errorf("the tunnel to the waypoint was lost (%v); %s ended", err, r.what())
		}
		if c, err = r.reconnect(ctx, err); err != nil || c == nil {
			return err
		}
	}
}

// ID is the session's ID, once registered.
func (r *Runner) ID() string { return r.id }

// conn is one tunnel and what its dial started.
type conn struct {
	t      *tunnel.Tunnel
	cancel context.CancelFunc
}

func (c *conn) close() {
	c.t.Close()
	c.cancel()
}

// RefusedError: the waypoint answered the registration with a refusal.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "the waypoint refused: " + e.Reason }

// EndedError: the waypoint ended the session (tunnel.EventEnded).
type EndedError struct{ Reason string }

func (e *EndedError) Error() string { return "the waypoint ended the session: " + e.Reason }

// errLost: the tunnel is gone.
var errLost = errors.New("the tunnel went silent or closed")

// reconnect dials and re-registers the session until it is back, the waypoint refuses it, or the
// grace period since the loss has passed. nil, nil: ctx ended.
func (r *Runner) reconnect(ctx context.Context, cause error) (*conn, error) {
	lost := time.Now()
	deadline := lost.Add(r.grace)
	r.notify(Notice{Kind: Lost, ID: r.id, Err: cause, Grace: r.grace})
	last := cause
	for attempt := 0; ; attempt++ {
		left := time.Until(deadline)
		if left <= 0 {
			return nil, fmt.Errorf("giving up: no tunnel to the waypoint for %v, the grace period (last error: %v); %s ended", r.grace, last, r.what())
		}
		timer := time.NewTimer(min(r.Backoff.Delay(attempt, r.rand()), left))
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, nil
		case <-timer.C:
		}
		c, _, err := r.register(ctx, r.id, min(DialTimeout, max(time.Until(deadline), time.Second)))
		if err == nil {
			r.notify(Notice{Kind: Back, ID: r.id, Transport: r.transport, After: time.Since(lost)})
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, nil
		}
		if refused := (*RefusedError)(nil); errors.As(err, &refused) && !strings.HasSuffix(refused.Reason, tunnel.Retry) {
			return nil, fmt.Errorf("the waypoint refused to resume %s: %s", r.what(), refused.Reason)
		}
		last = err
		r.log().Debug("devsession: reconnecting failed", "session", r.id, "attempt", attempt+1, "err", err)
	}
}

// register dials and sends the Hello (a Resume of id, when set). An older waypoint, which closes
// the tunnel on Hello fields it does not know, is asked again the old way.
func (r *Runner) register(ctx context.Context, id string, timeout time.Duration) (*conn, tunnel.Reply, error) {
	c, err := r.dial(ctx, timeout)
	if err != nil {
		return nil, tunnel.Reply{}, err
	}
	reply, err := r.exchange(c.t, r.hello(id), timeout)
	if errors.Is(err, errNoAnswer) && !r.legacy && id == "" {
		c.close()
		r.legacy = true
		r.notify(Notice{Kind: Legacy, Text: fmt.Sprintf("the waypoint closed the tunnel on this CLI's version exchange (detour %s, tunnel protocol %d): "+
			"it runs an older detour; registering the old way, and a lost tunnel will end the session", orUnknown(r.Version), tunnel.Protocol)})
		if c, err = r.dial(ctx, timeout); err != nil {
			return nil, tunnel.Reply{}, err
		}
		reply, err = r.exchange(c.t, r.hello(id), timeout)
	}
	if err == nil && !reply.OK {
		err = &RefusedError{Reason: reply.Error}
	}
	if err != nil {
		c.close()
		return nil, reply, err
	}
	r.grace = r.sessionGrace(reply)
	return c, reply, nil
}

// sessionGrace is how long to try to resume the session the waypoint answered for. With no
// session the waypoint keeps nothing, and any waypoint takes a new egress link: the Runner's own.
func (r *Runner) sessionGrace(reply tunnel.Reply) time.Duration {
	if r.Grace < 0 {
		return 0
	}
	g := r.Grace
	if g == 0 {
		g = DefaultGrace
	}
	if !r.session() {
		return g
	}
	if !reply.Has(tunnel.CapResume) || reply.GraceSeconds <= 0 {
		return 0
	}
	return min(g, time.Duration(reply.GraceSeconds)*time.Second)
}

// session reports whether the Runner registers a session (not only an egress link).
func (r *Runner) session() bool { return r.Spec.Service != "" }

// what names what a lost tunnel ends, for messages.
func (r *Runner) what() string {
	if r.session() {
		return "session " + r.id
	}
	return "the egress link"
}

func (r *Runner) hello(id string) tunnel.Hello {
	h := tunnel.Hello{Egress: r.Egress != nil, AsTarget: r.AsTarget}
	if r.session() {
		spec := r.Spec
		h.Register = &spec
	}
	if r.legacy {
		return h
	}
	h.Version, h.Protocol, h.Resume = orUnknown(r.Version), tunnel.Protocol, id
	if r.Grace >= 0 {
		h.Capabilities = []string{tunnel.CapResume}
		h.GraceSeconds = int(r.Grace / time.Second)
	}
	return h
}

// exchange sends h and reads the answer, within timeout.
func (r *Runner) exchange(t *tunnel.Tunnel, h tunnel.Hello, timeout time.Duration) (tunnel.Reply, error) {
	ctl := t.Control()
	ctl.SetDeadline(time.Now().Add(timeout))
	defer ctl.SetDeadline(time.Time{})
	if err := tunnel.WriteMsg(ctl, h); err != nil {
		return tunnel.Reply{}, fmt.Errorf("sending the session: %w", err)
	}
	reply, err := tunnel.ReadReply(ctl)
	if se := (*tunnel.SkewError)(nil); errors.As(err, &se) {
		return reply, fmt.Errorf("version skew: this CLI runs detour %s (tunnel protocol %d) and cannot read the answer of a waypoint running detour %s (tunnel protocol %d): %v; upgrade the CLI, or use one of the waypoint's version",
			orUnknown(r.Version), tunnel.Protocol, orUnknown(se.Version), se.Protocol, se.Err)
	}
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		return reply, fmt.Errorf("reading the waypoint's answer: %w (%w)", errNoAnswer, err)
	}
	if err != nil {
		return reply, fmt.Errorf("reading the waypoint's answer: %w", err)
	}
	return reply, nil
}

// errNoAnswer: the waypoint closed the tunnel instead of answering the Hello (what a waypoint
// older than the version exchange does with a Hello whose fields it does not know).
var errNoAnswer = errors.New("the waypoint closed the tunnel without an answer")

// dial opens a tunnel over the transport that worked last; a QUIC dial that gets no answer falls
// back to HTTP/2 over TCP, for this dial and the next ones.
func (r *Runner) dial(ctx context.Context, timeout time.Duration) (*conn, error) {
	tctx, cancel := context.WithCancel(ctx)
	if r.transport == "quic" {
		t, err := r.Dial(tctx, "quic", min(timeout, QUICAnswerTimeout))
		if err == nil {
			return &conn{t: t, cancel: cancel}, nil
		}
		if !errors.Is(err, tunnel.ErrNoAnswer) || ctx.Err() != nil {
			cancel()
			return nil, err
		}
		r.transport = "h2"
		r.notify(Notice{Kind: FellBack, Text: fmt.Sprintf("UDP to %s got no answer in %v; using HTTP/2 over TCP (UDP may be blocked)", r.Addr, min(timeout, QUICAnswerTimeout))})
	}
	t, err := r.Dial(tctx, r.transport, timeout)
	if err != nil {
		cancel()
		return nil, err
	}
	return &conn{t: t, cancel: cancel}, nil
}

// serve connects the tunnel's data streams to the app and reports its events until ctx ends
// (nil), the waypoint ends the session (*EndedError) or the tunnel is lost (the error says how).
func (r *Runner) serve(ctx context.Context, c *conn) error {
	t := c.t
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fwd := &tunnel.Forwarder{Addr: r.To, Seen: r.Seen, Egress: r.Egress}
	fwdDone := make(chan error, 1)
	go func() { fwdDone <- fwd.Serve(fctx, t) }()
	evDone := make(chan error, 1)
	go func() { evDone <- r.events(t.Control()) }()
	var err error
	select {
	case <-ctx.Done():
		hangUp(t, evDone)
	case <-t.Done():
		err = errLost
	case err = <-evDone:
		evDone <- err // for the wait below
	}
	t.Close()
	cancel()
	<-fwdDone
	<-evDone
	return err
}

// events reads the session's events until the control stream ends.
func (r *Runner) events(ctl net.Conn) error {
	for {
		var ev tunnel.Event
		if err := tunnel.ReadMsg(ctl, &ev); err != nil {
			if errors.Is(err, io.EOF) {
				return errLost
			}
			return err
		}
		if ev.Kind == tunnel.EventEnded {
			return &EndedError{Reason: ev.Error}
		}
		if r.Event != nil {
			r.Event(ev)
		}
	}
}

// hangUp ends the session: the control stream's half-close tells the waypoint (a closed tunnel
// alone would look like a lost one, which it keeps for a resume), then a short wait for it to
// close the tunnel.
func hangUp(t *tunnel.Tunnel, evDone chan error) {
	if cw, ok := t.Control().(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	timer := time.NewTimer(hangUpWait)
	defer timer.Stop()
	select {
	case err := <-evDone:
		evDone <- err
	case <-t.Done():
	case <-timer.C:
	}
}

func (r *Runner) notify(n Notice) {
	if r.Notify != nil {
		r.Notify(n)
	}
}

func (r *Runner) rand() float64 {
	if r.Rand != nil {
		return r.Rand()
	}
	return rand.Float64()
}

func (r *Runner) log() *slog.Logger {
	if r.Logger != nil {
		return r.Logger
	}
	return slog.Default()
}

func orUnknown(v string) string {
	if v == "" {
		return "(unknown version)"
	}
	return v
}
