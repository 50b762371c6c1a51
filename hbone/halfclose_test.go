package hbone_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/detour-mesh/detour/hbone"
)

// backend runs serve for every connection to a loopback listener.
func backend(t *testing.T, serve func(c *net.TCPConn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c.(*net.TCPConn))
			}()
		}
	}()
	return l.Addr().String()
}

func dialThrough(t *testing.T, target string) *hbone.Stream {
	t.Helper()
	p := newPKI(t)
	proxy := startServer(t, p, &hbone.Forwarder{})
	s, err := newDialer(t).Dial(ctxT(t), proxy, target, hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// The client sends a request, then FIN; the backend answers only after that FIN.
func TestHalfCloseRequestThenFIN(t *testing.T) {
	target := backend(t, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "got %d bytes", n)
	})
	s := dialThrough(t, target)
	s.Write(bytes.Repeat([]byte("x"), 300000))
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "got 300000 bytes" {
		t.Fatalf("got %q, %v", got, err)
	}
}

// The backend talks, sends FIN first, and keeps reading: the client must see EOF and still be
// able to send everything, which the backend must receive. A handler-based HTTP/2 server loses
// this upload (it resets the stream when the handler returns with the body unread).
func TestHalfCloseBackendFINFirst(t *testing.T) {
	received := make(chan int64, 1)
	target := backend(t, func(c *net.TCPConn) {
		c.Write([]byte("hello"))
		c.CloseWrite()
		n, _ := io.Copy(io.Discard, c)
		received <- n
	})
	s := dialThrough(t, target)
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "hello" {
		t.Fatalf("got %q, %v", got, err)
	}
	const size = 3 << 20
	if n, err := s.Write(make([]byte, size)); n != size || err != nil {
		t.Fatalf("write after the peer's FIN: %d, %v", n, err)
	}
	s.CloseWrite()
	select {
	case n := <-received:
		if n != size {
			t.Fatalf("backend received %d bytes, want %d", n, size)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("backend never saw the client's FIN")
	}
}

// A reset on the backend reaches the client as a reset, not a clean EOF.
func TestBackendResetResetsStream(t *testing.T) {
	target := backend(t, func(c *net.TCPConn) {
		c.Read(make([]byte, 1))
		c.SetLinger(0)
	})
	s := dialThrough(t, target)
	s.Write([]byte("x"))
	_, err := io.ReadAll(s)
	var re *hbone.ResetError
	if !errors.As(err, &re) || re.Code != http2.ErrCodeConnect {
		t.Fatalf("got %v, want RST_STREAM CONNECT_ERROR", err)
	}
}

// A reset from the client reaches the backend as a TCP RST, not a FIN.
func TestClientResetResetsBackend(t *testing.T) {
	backendErr := make(chan error, 1)
	target := backend(t, func(c *net.TCPConn) {
		c.Write([]byte("ready"))
		_, err := io.Copy(io.Discard, c)
		backendErr <- err
	})
	s := dialThrough(t, target)
	buf := make([]byte, 5)
	io.ReadFull(s, buf)
	s.Reset(http2.ErrCodeCancel)
	select {
	case err := <-backendErr:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("backend read ended with %v, want ECONNRESET", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("backend never saw the reset")
	}
}

// After one direction ends, the other may not stay silent past the half-close timeout.
func TestHalfCloseTimeout(t *testing.T) {
	p := newPKI(t)
	closed := make(chan struct{})
	target := backend(t, func(c *net.TCPConn) {
		c.CloseWrite()
		io.Copy(io.Discard, c) // ends when the proxy gives up on the silent client
		close(closed)
	})
	proxy := startServer(t, p, &hbone.Forwarder{HalfCloseTimeout: 100 * time.Millisecond})
	s, err := newDialer(t).Dial(ctxT(t), proxy, target, hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	io.ReadAll(s) // the backend's FIN; then the client says nothing
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the silent direction was never cut")
	}
}
