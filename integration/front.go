package integration

import (
	"io"
	"net"
	"sync"
	"testing"
)

// Front forwards each TCP connection to the address it points at when the connection arrives:
// what a Service or a port-forward in front of waypoint replicas is to the CLI. Point moves it;
// connections already forwarded stay where they are. The test's cleanup closes it and waits for
// every forwarded connection to end.
type Front struct {
	l  net.Listener
	mu sync.Mutex
	to string
	wg sync.WaitGroup
}

// NewFront listens on a loopback port and forwards to to.
func NewFront(t testing.TB, to string) *Front {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &Front{l: l, to: to}
	f.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			to := f.to
			f.mu.Unlock()
			f.wg.Go(func() { f.forward(c, to) })
		}
	})
	t.Cleanup(func() { l.Close(); f.wg.Wait() })
	return f
}

func (f *Front) forward(c net.Conn, to string) {
	defer c.Close()
	up, err := net.Dial("tcp", to)
	if err != nil {
		return
	}
	defer up.Close()
	done := make(chan struct{})
	go func() { io.Copy(up, c); up.Close(); close(done) }()
	io.Copy(c, up)
	c.Close()
	<-done
}

// Addr is the address the CLI dials.
func (f *Front) Addr() string { return f.l.Addr().String() }

// Point makes new connections go to to.
func (f *Front) Point(to string) { f.mu.Lock(); f.to = to; f.mu.Unlock() }
