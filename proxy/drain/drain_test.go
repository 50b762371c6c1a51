package drain_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity/devca/devcatest"
	"github.com/detour-mesh/detour/proxy/drain"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	serverID = "spiffe://cluster.local/ns/shop/sa/detour"
	clientID = "spiffe://cluster.local/ns/default/sa/client"
)

// bed is a real hbone.Server on loopback TCP (mutual TLS from an in-memory CA) whose handler
// echoes each stream until the client half-closes it, and a real hbone.Dialer.
type bed struct {
	srv     *hbone.Server
	addr    string
	dialer  *hbone.Dialer
	opts    hbone.DialOptions
	accepts atomic.Int32 // TCP connections the server accepted
	served  chan error   // Serve's result
}

func newBed(t *testing.T, h hbone.Handler) *bed {
	t.Helper()
	pr := devcatest.NewPair(t, serverID, clientID)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &bed{addr: l.Addr().String(), served: make(chan error, 1), dialer: &hbone.Dialer{Logger: slog.New(slog.DiscardHandler)},
		opts: hbone.DialOptions{TLSConfig: pr.ClientTLS, ServerID: serverID, LocalID: clientID}}
	b.srv = &hbone.Server{Handler: h, TLSConfig: pr.ServerTLS, Logger: slog.New(slog.DiscardHandler)}
	go func() { b.served <- b.srv.Serve(&countingListener{Listener: l, n: &b.accepts}) }()
	t.Cleanup(func() {
		b.dialer.Close()
		b.srv.Close()
	})
	return b
}

type countingListener struct {
	net.Listener
	n *atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// echo serves a stream: 200, then its bytes back until the client's half-close.
var echo = hbone.HandlerFunc(func(s *hbone.Stream) error {
	if err := s.Accept(); err != nil {
		return err
	}
	_, err := io.Copy(s, s)
	return err
})

func (b *bed) dial(t *testing.T) *hbone.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := b.dialer.Dial(ctx, b.addr, "10.0.0.1:80", b.opts)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	return s
}

// roundTrip writes msg on s and reads it back.
func roundTrip(t *testing.T, s *hbone.Stream, msg string) {
	t.Helper()
	if _, err := io.WriteString(s, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(s, got); err != nil || string(got) != msg {
		t.Fatalf("read back %q, %v; want %q", got, err, msg)
	}
}

// finish half-closes s and waits for the server's end of the stream.
func finish(t *testing.T, s *hbone.Stream) {
	t.Helper()
	if err := s.CloseWrite(); err != nil {
		t.Fatalf("half-close: %v", err)
	}
	if _, err := io.Copy(io.Discard, s); err != nil {
		t.Fatalf("reading to the end: %v", err)
	}
	s.Close()
}

// untilNewConnection dials (each stream a short echo) until the server has accepted want
// connections, and returns the streams it opened on the way; every dial must succeed.
func (b *bed) untilNewConnection(t *testing.T, want int32) []*hbone.Stream {
	t.Helper()
	var streams []*hbone.Stream
	deadline := time.Now().Add(10 * time.Second)
	for b.accepts.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("after %d streams the server accepted %d connections, want %d: the client was not moved", len(streams), b.accepts.Load(), want)
		}
		s := b.dial(t)
		roundTrip(t, s, "x")
		streams = append(streams, s)
	}
	return streams
}

// During the period the replica is not ready but serves everything: a stream open when the drain
// starts carries on, the client is moved off its connection by the GOAWAY (its next stream opens a
// new connection, which the server accepts and serves, and moves on in turn), no stream is
// refused. When the period ends (here: ctx, so that nothing depends on timing) the server waits
// for the streams still open and Drain returns once the last one finished; then nothing is
// accepted.
func TestDrainServesThroughThePeriodAndMovesClients(t *testing.T) {
	b := newBed(t, echo)
	d := &drain.Drainer{Server: b.srv, Period: time.Hour, Timeout: time.Minute, Logger: slog.New(slog.DiscardHandler)}
	open := b.dial(t) // connection 1, before the drain
	roundTrip(t, open, "before")
	if d.Draining() {
		t.Fatal("draining before Drain")
	}

	period, endPeriod := context.WithCancel(context.Background())
	drained := make(chan error, 1)
	go func() { drained <- d.Drain(period) }()
	deadline := time.Now().Add(10 * time.Second)
	for !d.Draining() {
		if time.Now().After(deadline) {
			t.Fatal("Drain did not start")
		}
		time.Sleep(time.Millisecond)
	}

	moved := b.untilNewConnection(t, 2)                  // told to go: the next stream is on connection 2
	moved = append(moved, b.untilNewConnection(t, 3)...) // connection 2, used while draining, is told too
	roundTrip(t, open, "during")                         // the stream open at the start is unaffected
	select {
	case err := <-drained:
		t.Fatalf("Drain returned during the period: %v", err)
	default:
	}

	endPeriod()
	for _, s := range moved {
		finish(t, s)
	}
	roundTrip(t, open, "after the period") // still served while the server waits for it
	select {
	case err := <-drained:
		t.Fatalf("Drain returned with a stream open: %v", err)
	default:
	}
	finish(t, open)
	if err := <-drained; err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if err := <-b.served; !errors.Is(err, hbone.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if s, err := b.dialer.Dial(ctx, b.addr, "10.0.0.1:80", b.opts); err == nil {
		s.Close()
		t.Fatal("a stream was accepted after the drain")
	}
}

// A stream that outlasts the timeout is closed by it, and Drain says so.
func TestDrainTimeoutClosesWhatIsLeft(t *testing.T) {
	b := newBed(t, hbone.HandlerFunc(func(s *hbone.Stream) error {
		if err := s.Accept(); err != nil {
			return err
		}
		<-s.Context().Done() // never finishes on its own
		return nil
	}))
	s := b.dial(t)
	d := &drain.Drainer{Server: b.srv, Timeout: 50 * time.Millisecond, Logger: slog.New(slog.DiscardHandler)}
	if err := d.Drain(context.Background()); !errors.Is(err, drain.ErrTimeout) {
		t.Fatalf("Drain = %v, want ErrTimeout", err)
	}
	if _, err := io.Copy(io.Discard, s); err == nil {
		t.Fatal("the stream left open ended cleanly; want it closed by the drain")
	}
	s.Close()
	if err := <-b.served; !errors.Is(err, hbone.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}

// The period ends on its own, and with nothing open Drain returns without waiting for the
// timeout.
func TestDrainPeriodEnds(t *testing.T) {
	b := newBed(t, echo)
	d := &drain.Drainer{Server: b.srv, Period: 10 * time.Millisecond, Timeout: time.Hour, Logger: slog.New(slog.DiscardHandler)}
	if err := d.Drain(context.Background()); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if !d.Draining() {
		t.Fatal("not draining after Drain")
	}
	if err := <-b.served; !errors.Is(err, hbone.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}
