package hbone_test

import (
	"bytes"
	"io"
	"net"
	"testing"

	"github.com/detour-mesh/detour/hbone"
)

// asyncRelay runs a server whose handler dials target through a Forwarder, detaches the
// stream and splices the pair with SpliceAsync, returning at once. Each pair's counts are sent
// on the returned channel once both directions end.
func asyncRelay(t *testing.T, target string) (addr string, p *pki, done <-chan hbone.Counts) {
	t.Helper()
	p = newPKI(t)
	fwd := startServer(t, p, &hbone.Forwarder{})
	onward := newDialer(t)
	results := make(chan hbone.Counts, 1)
	addr = startServer(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		up, err := onward.Dial(s.Context(), fwd, target, hbone.DialOptions{TLSConfig: p.clientTLS})
		if err != nil {
			return err
		}
		if err := s.Accept(); err != nil {
			up.Close()
			return err
		}
		release := s.Detach()
		if release == nil {
			t.Error("Detach on a served stream returned nil")
			up.Close()
			return nil
		}
		hbone.SpliceAsync(s, up, 0, func(c hbone.Counts, err error) {
			results <- c
			release(err)
		})
		return nil
	}))
	return addr, p, results
}

// A detached stream spliced without a goroutine of its own carries both halves of a
// conversation, passes each FIN on and is released (closed) once both ended.
func TestSpliceAsyncHalfClose(t *testing.T) {
	target := backend(t, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c)
		c.Write(bytes.Repeat([]byte("y"), int(n)/2))
	})
	addr, p, done := asyncRelay(t, target)
	d := newDialer(t)
	s, err := d.Dial(ctxT(t), addr, target, hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Detach() != nil {
		t.Error("Detach on a dialed stream: want nil")
	}
	if _, err := s.Write(bytes.Repeat([]byte("x"), 300000)); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil || len(got) != 150000 {
		t.Fatalf("read %d bytes, %v; want 150000", len(got), err)
	}
	if c := <-done; c.AToB != 300000 || c.BToA != 150000 {
		t.Fatalf("counts %+v, want 300000 and 150000", c)
	}
}

// A backend reset reaches the client through an async splice.
func TestSpliceAsyncReset(t *testing.T) {
	target := backend(t, func(c *net.TCPConn) {
		io.ReadFull(c, make([]byte, 1))
		c.SetLinger(0)
		c.Close()
	})
	addr, p, done := asyncRelay(t, target)
	s, err := newDialer(t).Dial(ctxT(t), addr, target, hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Write([]byte("x"))
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("read a clean EOF, want the backend's reset")
	}
	<-done
}

// Server.Close ends an idle detached stream pair: the relay's server waits for its release
// (Close returns only after it) and the client sees the stream fail.
func TestSpliceAsyncServerClose(t *testing.T) {
	p := newPKI(t)
	fwd := startServer(t, p, &hbone.Forwarder{})
	target := echoServer(t)
	onward := newDialer(t)
	released := make(chan struct{})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &hbone.Server{TLSConfig: p.serverTLS, Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
		up, err := onward.Dial(s.Context(), fwd, target, hbone.DialOptions{TLSConfig: p.clientTLS})
		if err != nil {
			return err
		}
		if err := s.Accept(); err != nil {
			up.Close()
			return err
		}
		release := s.Detach()
		hbone.SpliceAsync(s, up, 0, func(_ hbone.Counts, err error) {
			close(released) // before release: Close may return as soon as release runs
			release(err)
		})
		return nil
	})}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	s, err := newDialer(t).Dial(ctxT(t), l.Addr().String(), target, hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Write([]byte("x"))
	if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	select {
	case <-released:
	default:
		t.Fatal("Server.Close returned before the detached stream was released")
	}
	if err := <-served; err == nil {
		t.Fatal("Serve returned nil after Close")
	}
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("the client read a clean EOF after the server closed, want an error")
	}
}
