package hbone_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
	"golang.org/x/net/http2"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity/devca"
)

// rawConnect sends one request through Go's own HTTP/2 transport, so requests our Dialer would
// refuse to build can reach the server.
func rawConnect(t *testing.T, p *pki, proxy, method, authority string) *http.Response {
	t.Helper()
	tr := &http2.Transport{TLSClientConfig: p.clientTLS}
	t.Cleanup(tr.CloseIdleConnections)
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	req := &http.Request{Method: method, Host: authority, URL: &url.URL{Scheme: "https", Host: proxy, Path: "/"},
		Header: http.Header{}, Body: pr}
	if method == http.MethodConnect {
		req.URL.Path = ""
	}
	resp, err := tr.RoundTrip(req.WithContext(ctxT(t)))
	if err != nil {
		t.Fatalf("%s %s: %v", method, authority, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func TestStatuses(t *testing.T) {
	p := newPKI(t)
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	refused := closed.Addr().String()
	closed.Close()
	var dialed atomic.Int32
	h := &hbone.Forwarder{
		Authorize: func(r *hbone.Request) error {
			if r.Target.Port == 403 {
				return fmt.Errorf("policy says no: %w", hbone.ErrForbidden)
			}
			return nil
		},
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dialed.Add(1)
			if strings.HasSuffix(addr, ":504") {
				<-ctx.Done()
				return nil, ctx.Err()
			}
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
		DialTimeout: 100 * time.Millisecond,
	}
	proxy := startServer(t, p, h)
	for _, tc := range []struct {
		method, authority string
		want              int
	}{
		{"CONNECT", "no-port", 400},
		{"CONNECT", "10.0.0.1:0", 400},
		{"CONNECT", "10.0.0.1:99999", 400},
		{"CONNECT", "[fe80::1%eth0]:80", 400},
		{"GET", "10.0.0.1:80", 405},
		{"POST", "10.0.0.1:80", 405},
		{"CONNECT", "10.0.0.1:403", 403},
		{"CONNECT", refused, 503},
		{"CONNECT", "127.0.0.1:504", 504},
	} {
		t.Run(fmt.Sprintf("%s %s", tc.method, tc.authority), func(t *testing.T) {
			// The first final status is the only one the client sees: had a 200 gone out
			// before the upstream dial, this would read 200.
			resp := rawConnect(t, p, proxy, tc.method, tc.authority)
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
			}
		})
	}
	if n := dialed.Load(); n != 2 {
		t.Errorf("upstream dialed %d times, want 2 (only the 503 and 504 cases get that far)", n)
	}
}

func TestDialerSeesStatusError(t *testing.T) {
	p := newPKI(t)
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	refused := closed.Addr().String()
	closed.Close()
	proxy := startServer(t, p, &hbone.Forwarder{})
	_, err := newDialer(t).Dial(ctxT(t), proxy, refused, hbone.DialOptions{TLSConfig: p.clientTLS})
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != 503 {
		t.Fatalf("got %v, want a 503 StatusError", err)
	}
	want := fmt.Sprintf("hbone: dialing %s via %s: hbone: CONNECT answered 503 Service Unavailable", refused, proxy)
	if err.Error() != want {
		t.Fatalf("error %q, want %q", err, want)
	}
}

func TestRequestMetadata(t *testing.T) {
	p := newPKI(t)
	got := make(chan *hbone.Request, 1)
	proxy := startServer(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		got <- s.Request()
		return s.Accept()
	}))
	s, err := newDialer(t).Dial(ctxT(t), proxy, "10.1.2.3:8080", hbone.DialOptions{
		TLSConfig:   p.clientTLS,
		Forwarded:   hbone.FormatForwarded(hbone.ForwardedElement{For: "10.9.9.9:4321"}),
		Baggage:     "k8s.namespace.name=default",
		Traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		Header:      http.Header{"X-Extra": {"1"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r := <-got
	if r.Target.String() != "10.1.2.3:8080" || !r.Target.IsAddr() {
		t.Errorf("target %v", r.Target)
	}
	if r.PeerID.String() != clientID {
		t.Errorf("peer %q, want %q", r.PeerID, clientID)
	}
	if src, ok := r.OriginalSource(); !ok || src.String() != "10.9.9.9:4321" {
		t.Errorf("original source %v %v (Forwarded %q)", src, ok, r.Forwarded)
	}
	if r.Baggage != "k8s.namespace.name=default" || r.Traceparent != "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" {
		t.Errorf("baggage %q traceparent %q", r.Baggage, r.Traceparent)
	}
	if r.Header.Get("X-Extra") != "1" {
		t.Errorf("header %v", r.Header)
	}
	if r.LocalAddr.String() != proxy || r.RemoteAddr == nil {
		t.Errorf("addrs %v %v", r.LocalAddr, r.RemoteAddr)
	}
}

func TestHandshakeRefusals(t *testing.T) {
	p := newPKI(t)
	var served atomic.Int32
	proxy := startServer(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		served.Add(1)
		return s.Accept()
	}))
	other, _ := devca.New("other.example")
	otherSVID, _ := other.Issue("spiffe://other.example/ns/default/sa/client", time.Time{}, time.Time{})
	expired, _ := p.ca.Issue(clientID, time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour))
	serverSPIFFE := spiffeid.RequireFromString(serverID)

	noCert := p.ca.ClientTLS(nil, serverSPIFFE)
	noCert.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return &tls.Certificate{}, nil
	}
	foreign := p.ca.ClientTLS(otherSVID, serverSPIFFE)
	old := p.ca.ClientTLS(expired, serverSPIFFE)
	for name, cfg := range map[string]*tls.Config{"no certificate": noCert, "other trust domain": foreign, "expired": old} {
		t.Run(name, func(t *testing.T) {
			d := newDialer(t)
			_, err := d.Dial(ctxT(t), proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: cfg})
			if err == nil || !strings.Contains(err.Error(), "TLS handshake") && !strings.Contains(err.Error(), "tls:") {
				t.Fatalf("got %v, want a handshake failure", err)
			}
		})
	}
	if n := served.Load(); n != 0 {
		t.Fatalf("handler ran %d times", n)
	}
}

func TestClientRefusesWrongServerIdentity(t *testing.T) {
	p := newPKI(t)
	proxy := startServer(t, p, &hbone.Forwarder{})
	cli, _ := p.ca.Issue(clientID, time.Time{}, time.Time{})
	cfg := p.ca.ClientTLS(cli, spiffeid.RequireFromString("spiffe://cluster.local/ns/detour/sa/someone-else"))
	_, err := newDialer(t).Dial(ctxT(t), proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: cfg})
	if err == nil || !strings.Contains(err.Error(), "unexpected ID") {
		t.Fatalf("got %v, want an identity mismatch", err)
	}
}

func TestServerRejectsTLSConfigWithoutClientVerification(t *testing.T) {
	p := newPKI(t)
	cfg := p.serverTLS.Clone()
	cfg.ClientAuth, cfg.VerifyPeerCertificate = tls.RequireAnyClientCert, nil
	srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: cfg}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	defer l.Close()
	err := srv.Serve(l)
	if err == nil || err.Error() != "hbone: TLS config requires client certificates but verifies none" {
		t.Fatalf("got %v", err)
	}
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func serveCounting(t *testing.T, p *pki, h hbone.Handler) (string, *countingListener) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: l}
	srv := &hbone.Server{Handler: h, TLSConfig: p.serverTLS}
	done := make(chan struct{})
	go func() { srv.Serve(cl); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return l.Addr().String(), cl
}

func concurrentEcho(t *testing.T, d *hbone.Dialer, p *pki, proxy, echo string, n int) {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := d.Dial(ctxT(t), proxy, echo, hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			msg := []byte(fmt.Sprintf("stream %d", i))
			if _, err := s.Write(msg); err != nil {
				errs <- err
				return
			}
			s.CloseWrite()
			got, err := io.ReadAll(s)
			if err != nil || !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("stream %d: got %q, %v", i, got, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestThousandStreamsOneConnection(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	proxy, cl := serveCounting(t, p, &hbone.Forwarder{})
	d := &hbone.Dialer{Config: hbone.Config{MaxConcurrentStreams: 1000}}
	defer d.Close()
	concurrentEcho(t, d, p, proxy, echo, 1000)
	if n := cl.n.Load(); n != 1 {
		t.Fatalf("%d connections, want 1", n)
	}
}

func TestPoolOpensConnectionsPastStreamLimit(t *testing.T) {
	p := newPKI(t)
	proxy, cl := serveCounting(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		s.Accept()
		io.Copy(io.Discard, s)
		return nil
	}))
	var dials atomic.Int32
	d := &hbone.Dialer{NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer d.Close()
	var streams []*hbone.Stream
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 250 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := d.Dial(ctxT(t), proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			streams = append(streams, s)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if n := cl.n.Load(); n != 3 {
		t.Errorf("%d connections for 250 streams, want 3 (100 streams each)", n)
	}
	if n := dials.Load(); n != 3 {
		t.Errorf("%d dials, want 3: concurrent dials for one key must coalesce", n)
	}
	for _, s := range streams {
		s.Close()
	}
	// A different expected identity is a different pool key: a new connection.
	s, err := d.Dial(ctxT(t), proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID, LocalID: "other"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if n := cl.n.Load(); n != 4 {
		t.Errorf("%d connections, want 4", n)
	}
}

func TestDeadConnectionEvicted(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	proxy := l.Addr().String()
	srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: p.serverTLS}
	go srv.Serve(l)
	d := newDialer(t)
	concurrentEcho(t, d, p, proxy, echo, 1)
	srv.Close()
	l2, err := net.Listen("tcp", proxy)
	if err != nil {
		t.Skipf("port reuse: %v", err)
	}
	srv2 := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: p.serverTLS}
	go srv2.Serve(l2)
	defer srv2.Close()
	concurrentEcho(t, d, p, proxy, echo, 1)
}

func TestDoubleHBONE(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	inner := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: p.serverTLS}
	defer inner.Close()
	var outerAuthority atomic.Value
	gateway := startServer(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		outerAuthority.Store(s.Request().Target.String())
		if err := s.Accept(); err != nil {
			return err
		}
		return inner.ServeConn(s.Context(), s)
	}))
	d := newDialer(t)
	s, err := d.DialDouble(ctxT(t), gateway, "echo.default.svc.cluster.local:80",
		hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID},
		echo, hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
	if err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("double "), 100000)
	go func() { s.Write(msg); s.CloseWrite() }()
	got, err := io.ReadAll(s)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("got %d bytes, %v", len(got), err)
	}
	s.Close()
	if a := outerAuthority.Load(); a != "echo.default.svc.cluster.local:80" {
		t.Fatalf("outer authority %v", a)
	}
}

func TestGracefulShutdown(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: p.serverTLS}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	d := newDialer(t)
	s, err := d.Dial(ctxT(t), l.Addr().String(), echo, hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(ctxT(t)) }()
	if err := <-served; !errors.Is(err, hbone.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	// The open stream keeps working while the server drains.
	if _, err := s.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "still here" {
		t.Fatalf("got %q, %v", got, err)
	}
	s.Close()
	select {
	case err := <-shut:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the last stream ended")
	}
	// New streams are refused.
	if _, err := d.Dial(ctxT(t), l.Addr().String(), echo, hbone.DialOptions{TLSConfig: p.clientTLS}); err == nil {
		t.Fatal("dial after shutdown succeeded")
	}
}

func TestShutdownDeadlineClosesStreams(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: p.serverTLS}
	go srv.Serve(l)
	d := newDialer(t)
	s, err := d.Dial(ctxT(t), l.Addr().String(), echo, hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("stream survived a forced shutdown")
	}
}

func TestKeepaliveDropsSilentPeer(t *testing.T) {
	p := newPKI(t)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: p.serverTLS,
		Config: hbone.Config{PingInterval: 50 * time.Millisecond, PingTimeout: 200 * time.Millisecond}}
	go srv.Serve(l)
	defer srv.Close()
	cfg := p.clientTLS.Clone()
	cfg.NextProtos = []string{"h2"}
	tc, err := tls.Dial("tcp", l.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	// A client that sends the preface and then never answers anything.
	tc.Write([]byte(http2.ClientPreface))
	http2.NewFramer(tc, nil).WriteSettings()
	tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	_, err = io.Copy(io.Discard, tc)
	if time.Since(start) > 5*time.Second {
		t.Fatalf("server kept a silent peer for %v (%v)", time.Since(start), err)
	}
}

func TestReadDeadline(t *testing.T) {
	p := newPKI(t)
	proxy := startServer(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		s.Accept()
		io.Copy(io.Discard, s)
		return nil
	}))
	s, err := newDialer(t).Dial(ctxT(t), proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: p.clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	var ne net.Error
	if _, err := s.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("got %v, want a timeout", err)
	}
}

// Streams leave nothing behind: once they end, the goroutine count is back to what the open
// connection alone needs.
func TestNoGoroutinesLeftAfterStreams(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	proxy := startServer(t, p, &hbone.Forwarder{})
	d := &hbone.Dialer{Config: hbone.Config{MaxConcurrentStreams: 1000}} // all on one connection
	defer d.Close()
	concurrentEcho(t, d, p, proxy, echo, 1) // the pooled connection and its goroutines exist now
	time.Sleep(50 * time.Millisecond)
	baseline := goleak.IgnoreCurrent()
	concurrentEcho(t, d, p, proxy, echo, 200)
	if err := goleak.Find(baseline); err != nil {
		t.Fatal(err)
	}
}
