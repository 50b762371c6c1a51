package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
)

// Handler serves one accepted CONNECT. It runs in its own goroutine. It calls s.Accept once the
// stream can be served (after its upstream dial succeeded) and then moves bytes; an error returned
// before Accept becomes the CONNECT status (see Status), an error after Accept resets the stream
// with CONNECT_ERROR. The server closes the stream when the handler returns.
type Handler interface {
	ServeHBONE(s *Stream) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(s *Stream) error

func (f HandlerFunc) ServeHBONE(s *Stream) error { return f(s) }

// Server terminates HBONE: mutual TLS 1.3 with ALPN h2, then HTTP/2 CONNECT streams handed to
// Handler. The zero Config means ztunnel's settings; a nil Logger means slog.Default().
type Server struct {
	Handler   Handler
	TLSConfig *tls.Config // must verify client certificates (see tlsConfig)
	Config    Config
	Logger    *slog.Logger

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closed    bool
	draining  atomic.Bool    // Drain was called: every connection that carries a stream is told to go
	wg        sync.WaitGroup // connections and handlers
}

func (srv *Server) log() *slog.Logger {
	if srv.Logger != nil {
		return srv.Logger
	}
	return slog.Default()
}

// tlsConfig returns the server TLS config: TLS 1.3 only, ALPN h2, and a client certificate
// required. It fails closed on a config that would accept unverified client certificates.
func (srv *Server) tlsConfig() (*tls.Config, error) {
	if srv.TLSConfig == nil {
		return nil, errors.New("hbone: server has no TLS config")
	}
	cfg := srv.TLSConfig.Clone()
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{http2.NextProtoTLS}
	switch cfg.ClientAuth {
	case tls.RequireAndVerifyClientCert:
	case tls.RequireAnyClientCert:
		if cfg.VerifyPeerCertificate == nil && cfg.VerifyConnection == nil {
			return nil, errors.New("hbone: TLS config requires client certificates but verifies none")
		}
	default:
		if cfg.ClientCAs == nil && cfg.VerifyPeerCertificate == nil && cfg.VerifyConnection == nil {
			return nil, errors.New("hbone: TLS config has no way to verify client certificates")
		}
		if cfg.ClientCAs != nil {
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
		} else {
			cfg.ClientAuth = tls.RequireAnyClientCert
		}
	}
	return cfg, nil
}

// Serve accepts connections on l until Shutdown or Close, and returns ErrServerClosed then.
func (srv *Server) Serve(l net.Listener) error {
	if _, err := srv.tlsConfig(); err != nil {
		return err
	}
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		return ErrServerClosed
	}
	if srv.listeners == nil {
		srv.listeners = map[net.Listener]struct{}{}
	}
	srv.listeners[l] = struct{}{}
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.listeners, l)
		srv.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if srv.isClosed() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("hbone: accepting: %w", err)
		}
		backoff = 0
		if !srv.track(1) {
			nc.Close()
			return ErrServerClosed
		}
		go func() {
			defer srv.wg.Done()
			if err := srv.serveConn(context.Background(), nc); err != nil {
				srv.log().Debug("hbone: connection ended", "remote", nc.RemoteAddr(), "err", err)
			}
		}()
	}
}

// track adds n to the server's wait group unless the server is closed.
func (srv *Server) track(n int) bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.closed {
		return false
	}
	srv.wg.Add(n)
	return true
}

func (srv *Server) isClosed() bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.closed
}

// ServeConn runs the TLS handshake on nc and serves HBONE on it until the connection ends or ctx
// is cancelled. nc may be a TCP connection or a Stream (the inner hop of double HBONE).
func (srv *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	if !srv.track(1) {
		nc.Close()
		return ErrServerClosed
	}
	defer srv.wg.Done()
	return srv.serveConn(ctx, nc)
}

func (srv *Server) serveConn(ctx context.Context, nc net.Conn) error {
	cfg := srv.Config.withDefaults(true)
	tlsCfg, err := srv.tlsConfig()
	if err != nil {
		nc.Close()
		return err
	}
	wire := newWireConn(nc)
	tc, err := handshakeServer(ctx, wire, tlsCfg, cfg.HandshakeTimeout)
	if err != nil {
		return err
	}
	c := newConn(tc, wire, true, cfg, srv.log())
	c.peerID = peerID(tc.ConnectionState().PeerCertificates)
	c.onStream = srv.handleStream
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		tc.Close()
		return ErrServerClosed
	}
	if srv.conns == nil {
		srv.conns = map[*conn]struct{}{}
	}
	srv.conns[c] = struct{}{}
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.conns, c)
		srv.mu.Unlock()
	}()
	c.start()
	stop := context.AfterFunc(ctx, func() { c.close(ctx.Err()) })
	defer stop()
	if err := c.readSettings(); err != nil {
		c.close(err)
		<-c.writerDone
		return fmt.Errorf("hbone: reading the client's SETTINGS from %s: %w", tc.RemoteAddr(), err)
	}
	return c.readLoop()
}

// handshakeServer runs the TLS handshake and reads the HTTP/2 client preface, both within
// timeout, and checks that h2 was negotiated.
func handshakeServer(ctx context.Context, nc net.Conn, cfg *tls.Config, timeout time.Duration) (*tls.Conn, error) {
	tc := tls.Server(nc, cfg)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	fail := func(what string, err error) (*tls.Conn, error) {
		nc.Close()
		return nil, fmt.Errorf("hbone: %s with %s: %w", what, nc.RemoteAddr(), err)
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		return fail("TLS handshake", err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != http2.NextProtoTLS {
		return fail("negotiating ALPN", fmt.Errorf("got %q, want h2", p))
	}
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(tc, preface[:]); err != nil {
		return fail("reading the HTTP/2 preface", err)
	}
	if string(preface[:]) != http2.ClientPreface {
		return fail("reading the HTTP/2 preface", errors.New("bad preface"))
	}
	if !stop() {
		return fail("reading the HTTP/2 preface", ctx.Err())
	}
	nc.SetDeadline(time.Time{})
	return tc, nil
}

// handleStream admits one CONNECT (counted before its goroutine starts, so Shutdown waits for
// it) and runs its handler.
func (srv *Server) handleStream(s *Stream) {
	if srv.draining.Load() {
		s.c.notice()
	}
	if !srv.track(1) {
		s.respond(503)
		s.c.handlerDone()
		return
	}
	s.srv = srv
	go srv.serveStream(s)
}

// serveStream runs the handler and maps its result to the status, once; a handler that detached
// the stream (Stream.Detach) maps it when it releases it.
func (srv *Server) serveStream(s *Stream) {
	err := srv.Handler.ServeHBONE(s)
	if s.detached.Load() {
		return
	}
	srv.finishStream(s, err)
}

// finishStream answers or resets the stream by its handler's result, closes it and lets the
// server's accounting (Shutdown, the connection's active handlers) forget it.
func (srv *Server) finishStream(s *Stream, err error) {
	defer srv.wg.Done()
	defer s.c.handlerDone()
	switch {
	case !s.accepted.Load():
		code := Status(err)
		if err == nil {
			code = 502
		}
		srv.log().Info("hbone: CONNECT refused", "target", s.req.Target.String(), "peer", s.req.PeerID.String(),
			"status", code, "err", err)
		s.respond(code)
	case err != nil && !errors.Is(err, ErrStreamClosed):
		srv.log().Debug("hbone: stream aborted", "target", s.req.Target.String(), "err", err)
		s.Reset(http2.ErrCodeConnect)
	}
	s.Close()
}

// Drain starts a graceful drain while the server keeps serving: the listeners stay open and every
// stream is served, but each connection that carries a stream is sent the notice GOAWAY (last
// stream ID 2^31-1, NO_ERROR), at once or with its first stream, so clients open their next
// streams on new connections, to other replicas once their endpoints are gone. Envoy does the
// same while draining (drain_listeners?graceful: listeners open until the drain ends, requests
// discouraged; Istio runs it with --drain-strategy immediate). Shutdown ends the drain. Drain is
// idempotent.
func (srv *Server) Drain() {
	srv.draining.Store(true)
	srv.mu.Lock()
	conns := make([]*conn, 0, len(srv.conns))
	for c := range srv.conns {
		conns = append(conns, c)
	}
	srv.mu.Unlock()
	for _, c := range conns {
		c.noticeIfUsed()
	}
}

// Shutdown stops accepting, sends GOAWAY on every connection and waits for their streams to end;
// when ctx ends first, it closes what is left. It returns once every goroutine has exited.
func (srv *Server) Shutdown(ctx context.Context) error {
	conns := srv.stop()
	for _, c := range conns {
		c.goAway(http2.ErrCodeNo, nil)
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		srv.mu.Lock()
		n := len(srv.conns)
		srv.mu.Unlock()
		if n == 0 {
			srv.wg.Wait()
			return nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			srv.Close()
			return ctx.Err()
		}
	}
}

// Close closes the listeners and every connection at once, and waits for every goroutine.
func (srv *Server) Close() error {
	for _, c := range srv.stop() {
		c.close(ErrServerClosed)
	}
	srv.wg.Wait()
	return nil
}

// stop marks the server closed, closes its listeners and returns its connections.
func (srv *Server) stop() []*conn {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.closed = true
	for l := range srv.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(srv.conns))
	for c := range srv.conns {
		conns = append(conns, c)
	}
	return conns
}
