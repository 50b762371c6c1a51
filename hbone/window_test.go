package hbone_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/detour-mesh/detour/hbone"
)

// Targets of windowServer: a stream to stallPort is accepted and never read; a stream to
// sinkPort is read to its end and answered with the byte count.
const (
	stallPort = 1
	sinkPort  = 2
)

func windowServer(t *testing.T, p *pki) (*hbone.Server, string, *countingListener) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: l}
	srv := &hbone.Server{TLSConfig: p.serverTLS, Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
		if err := s.Accept(); err != nil {
			return err
		}
		if s.Request().Target.Port == stallPort {
			<-s.Context().Done()
			return nil
		}
		n, err := io.Copy(io.Discard, s)
		if err != nil {
			return err
		}
		s.Write([]byte(strconv.FormatInt(n, 10)))
		return s.CloseWrite()
	})}
	done := make(chan struct{})
	go func() { srv.Serve(cl); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return srv, l.Addr().String(), cl
}

// stall opens a stream to the stalling target.
func stall(ctx context.Context, d *hbone.Dialer, p *pki, proxy string) (*hbone.Stream, error) {
	return d.Dial(ctx, proxy, fmt.Sprintf("10.0.0.1:%d", stallPort), hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
}

// A stream whose reader stalls stalls only itself: K streams on one connection whose server side
// never reads fill their stream windows, and another stream on the same connection still moves
// 10 MiB. (Before, their unread bytes held the whole connection window and every other stream on
// the connection, on the waypoint other clients' streams, waited.)
func TestStalledStreamsDoNotBlockTheConnection(t *testing.T) {
	p := newPKI(t)
	_, proxy, cl := windowServer(t, p)
	d := newDialer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second) // a hang guard only
	defer cancel()
	const k = 4 // 4 x the 4 MiB stream window is the whole 16 MiB connection window
	for i := range k {
		s, err := stall(ctx, d, p, proxy)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		s.SetWriteDeadline(time.Now().Add(20 * time.Second)) // a hang guard only
		if _, err := s.Write(make([]byte, hbone.DefaultStreamWindow)); err != nil {
			t.Fatalf("filling the window of stalled stream %d: %v", i, err)
		}
	}
	s, err := d.Dial(ctx, proxy, fmt.Sprintf("10.0.0.1:%d", sinkPort), hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(20 * time.Second))
	const total = 10 << 20
	if _, err := s.Write(make([]byte, total)); err != nil {
		t.Fatalf("writing 10 MiB beside %d stalled streams: %v", k, err)
	}
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != strconv.Itoa(total) {
		t.Fatalf("the sink read %q bytes, %v; want %d", got, err, total)
	}
	if n := cl.n.Load(); n != 1 {
		t.Fatalf("%d connections, want all streams on one", n)
	}
}

// Returning window on arrival is bounded per connection: past DefaultConnBuffer unread bytes,
// the connection window is returned on read again, so a peer with many stalled streams holds at
// most the connection window plus that budget. Streams fill their windows one after another:
// 16 MiB returned on arrival, then 16 MiB held, then no more.
func TestStalledStreamsMemoryBounded(t *testing.T) {
	p := newPKI(t)
	srv, proxy, _ := windowServer(t, p)
	d := newDialer(t)
	const bound = hbone.DefaultConnWindow + hbone.DefaultConnBuffer
	const fit = bound / hbone.DefaultStreamWindow
	for i := range fit + 1 {
		s, err := stall(ctxT(t), d, p, proxy)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		hang := 20 * time.Second // a hang guard only
		if i == fit {
			hang = 200 * time.Millisecond // this one must not get window: no need to wait long
		}
		s.SetWriteDeadline(time.Now().Add(hang))
		_, err = s.Write(make([]byte, hbone.DefaultStreamWindow))
		if i < fit && err != nil {
			t.Fatalf("stalled stream %d of %d could not fill its window: %v", i+1, fit, err)
		}
		if n := hbone.Buffered(srv); n > bound {
			t.Fatalf("%d unread bytes buffered on one connection after %d streams, bound %d", n, i+1, bound)
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// The pool key includes the tenant: two tenants never share a connection, one tenant's streams
// do.
func TestPoolPerTenant(t *testing.T) {
	p := newPKI(t)
	_, proxy, cl := windowServer(t, p)
	d := newDialer(t)
	dial := func(tenant string) *hbone.Stream {
		s, err := d.Dial(ctxT(t), proxy, fmt.Sprintf("10.0.0.1:%d", stallPort),
			hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID, Tenant: tenant})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	a1, a2 := dial("spiffe://cluster.local/ns/a/sa/a"), dial("spiffe://cluster.local/ns/a/sa/a")
	b := dial("spiffe://cluster.local/ns/b/sa/b")
	if a1.LocalAddr().String() != a2.LocalAddr().String() {
		t.Errorf("one tenant's streams on two connections (%v, %v)", a1.LocalAddr(), a2.LocalAddr())
	}
	if a1.LocalAddr().String() == b.LocalAddr().String() {
		t.Errorf("two tenants share connection %v", b.LocalAddr())
	}
	if n := cl.n.Load(); n != 2 {
		t.Errorf("%d connections for two tenants, want 2", n)
	}
}

// A deadline set while a Write waits for window (here with none set before) ends the Write, as
// net.Conn promises.
func TestWriteDeadlineSetWhileBlocked(t *testing.T) {
	p := newPKI(t)
	_, proxy, _ := windowServer(t, p)
	s, err := stall(ctxT(t), newDialer(t), p, proxy)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	done := make(chan error, 1)
	go func() {
		_, err := s.Write(make([]byte, hbone.DefaultStreamWindow+1))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the Write block on the full stream window
	s.SetWriteDeadline(time.Now())
	select {
	case err := <-done:
		if !isTimeout(err) {
			t.Fatalf("got %v, want a timeout", err)
		}
	case <-time.After(10 * time.Second): // a hang guard
		t.Fatal("the blocked Write never saw its deadline")
	}
}
