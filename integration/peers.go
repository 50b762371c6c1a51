package integration

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"

	istiohbone "istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity/devca/devcatest"
)

// QuietIstio turns off Istio's hbone logging (a line per stream), so benchmark output stays
// readable. Tests that want it call nothing.
func QuietIstio() {
	if s := istiolog.FindScope("hbone"); s != nil {
		s.SetOutputLevel(istiolog.NoneLevel)
	}
}

// Identities used by the interop tests and benchmarks.
const (
	ServerID = "spiffe://cluster.local/ns/detour/sa/waypoint"
	ClientID = "spiffe://cluster.local/ns/default/sa/client"
)

// PKI is a dev CA with a server (ServerID) and a client (ClientID) SVID and their TLS configs.
type PKI = devcatest.Pair

// NewPKI mints the test identities.
func NewPKI(t testing.TB) *PKI {
	t.Helper()
	return devcatest.NewPair(t, ServerID, ClientID)
}

// Listen opens a loopback listener closed at the end of the test.
func Listen(t testing.TB) net.Listener {
	t.Helper()
	return ListenAt(t, "127.0.0.1:0")
}

// ListenAt opens a TCP listener on addr (another loopback address such as 127.0.0.2 stands in for
// a pod), closed at the end of the test.
func ListenAt(t testing.TB, addr string) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// Backend runs serve for each connection to a loopback listener and returns its address.
func Backend(t testing.TB, serve func(c *net.TCPConn)) string {
	t.Helper()
	return BackendOn(t, Listen(t), serve)
}

// BackendOn is Backend on the listener l (closed at the end of the test).
func BackendOn(t testing.TB, l net.Listener, serve func(c *net.TCPConn)) string {
	t.Helper()
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

// Echo is a backend that echoes and half-closes after the client's FIN.
func Echo(t testing.TB) string {
	return Backend(t, func(c *net.TCPConn) {
		io.Copy(c, c)
		c.CloseWrite()
	})
}

// Sink is a backend that discards what it reads.
func Sink(t testing.TB) string {
	return Backend(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
}

// CountingListener counts accepted connections.
type CountingListener struct {
	net.Listener
	mu sync.Mutex
	n  int
}

func (l *CountingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.n++
		l.mu.Unlock()
	}
	return c, err
}

// Count is the number of connections accepted so far.
func (l *CountingListener) Count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// DetourServer runs detour's HBONE server with h and returns its listener.
func DetourServer(t testing.TB, p *PKI, h hbone.Handler) *CountingListener {
	t.Helper()
	l := &CountingListener{Listener: Listen(t)}
	srv := &hbone.Server{Handler: h, TLSConfig: p.ServerTLS}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			t.Errorf("detour Serve: %v", err)
		}
	})
	return l
}

// IstioServer runs Istio's Go HBONE server (pkg/hbone.NewServer) over mutual TLS with h2. Its
// constructor enables only HTTP/1 and cleartext HTTP/2, so HTTP/2 over TLS is switched on here.
// maxStreams raises Go's default of 250 concurrent streams per connection when non-zero.
func IstioServer(t testing.TB, p *PKI, maxStreams int) *CountingListener {
	t.Helper()
	return serveIstio(t, istiohbone.NewServer(), p, maxStreams)
}

// IstioDoubleServer runs Istio's double-HBONE server: the outer CONNECT carries an inner HBONE
// connection whose TLS uses innerTLS.
func IstioDoubleServer(t testing.TB, p *PKI, innerTLS *tls.Config) *CountingListener {
	t.Helper()
	return serveIstio(t, istiohbone.NewDoubleHBONEServer(innerTLS), p, 0)
}

func serveIstio(t testing.TB, srv *http.Server, p *PKI, maxStreams int) *CountingListener {
	if maxStreams > 0 {
		srv.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: maxStreams}
	}
	l := &CountingListener{Listener: Listen(t)}
	serveIstioOn(t, srv, l, p.ServerTLS)
	return l
}

// IstioServerOn runs Istio's Go HBONE server on l with tlsCfg (HTTP/2 over TLS switched on).
func IstioServerOn(t testing.TB, l net.Listener, tlsCfg *tls.Config) {
	serveIstioOn(t, istiohbone.NewServer(), l, tlsCfg)
}

func serveIstioOn(t testing.TB, srv *http.Server, l net.Listener, tlsCfg *tls.Config) {
	srv.Protocols.SetHTTP2(true)
	srv.TLSConfig = tlsCfg.Clone()
	srv.TLSConfig.NextProtos = []string{"h2"}
	done := make(chan struct{})
	go func() { srv.ServeTLS(l, "", ""); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
}

// IstioDialer is Istio's Go HBONE client through proxy.
func IstioDialer(p *PKI, proxy string) istiohbone.Dialer {
	return istiohbone.NewDialer(istiohbone.Config{ProxyAddress: proxy, TLS: p.ClientTLS.Clone()})
}

// FreePort is a port number free on TCP on every ip a moment ago.
func FreePort(t testing.TB, ips ...string) int {
	t.Helper()
	ls := ListenSamePort(t, ips)
	for _, l := range ls {
		l.Close()
	}
	return ls[0].Addr().(*net.TCPAddr).Port
}

// ListenSamePort listens on one port number on every ip (closed at the end of the test).
func ListenSamePort(t testing.TB, ips []string) []net.Listener {
	t.Helper()
	for range 20 {
		first := ListenAt(t, ips[0]+":0")
		ls := []net.Listener{first}
		port := strconv.Itoa(first.Addr().(*net.TCPAddr).Port)
		for _, ip := range ips[1:] {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, port))
			if err != nil {
				break
			}
			t.Cleanup(func() { l.Close() })
			ls = append(ls, l)
		}
		if len(ls) == len(ips) {
			return ls
		}
		for _, l := range ls {
			l.Close()
		}
	}
	t.Fatalf("no port free on all of %v", ips)
	return nil
}
