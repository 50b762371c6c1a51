package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// DialOptions says how to reach the proxy and what the CONNECT carries.
type DialOptions struct {
	// TLSConfig presents our certificate and verifies the proxy's (the identity package builds
	// it). Required.
	TLSConfig *tls.Config
	// ServerID and LocalID are the expected proxy identity and our own. With the proxy address
	// they key the connection pool: streams share a connection only when all three match. The
	// check itself is TLSConfig's job.
	ServerID string
	LocalID  string
	// Tenant, when set, is one more part of the pool key: streams of different tenants never
	// share a connection. The waypoint sets it to the inbound peer's identity, as ztunnel pools
	// per source workload, so one client's unread streams never take window or stream slots from
	// another client's (no head-of-line blocking across clients).
	Tenant string

	Forwarded   string // original source, e.g. FormatForwarded(ForwardedElement{For: "10.0.0.1:3456"})
	Baggage     string
	Traceparent string
	Header      http.Header // any other request headers
}

// Dialer opens HBONE streams, pooling connections per (proxy address, ServerID, LocalID, Tenant):
// a new connection when the pooled ones carry MaxConcurrentStreams (default 100, or fewer if the
// proxy says so), dead or draining connections dropped, concurrent dials for one key coalesced.
// The zero value is ready to use; Close it to release its connections.
type Dialer struct {
	Config Config
	// NetDial opens the TCP connection; nil means a net.Dialer.
	NetDial func(ctx context.Context, network, addr string) (net.Conn, error)
	Logger  *slog.Logger // nil means slog.Default()

	mu     sync.Mutex
	pools  map[poolKey]*pool
	all    map[*conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

type poolKey struct{ addr, serverID, localID, tenant string }

type pool struct {
	conns   []*conn
	dialing *dialCall
}

type dialCall struct {
	done chan struct{}
	err  error
}

const dialRetries = 3

// Dial opens a stream to target (an IP:port, or host:port for double HBONE's outer hop) through
// the HBONE proxy at proxyAddr. It returns once the proxy answered 200; any other answer is a
// *StatusError. A stream refused by a draining connection is retried on another.
func (d *Dialer) Dial(ctx context.Context, proxyAddr, target string, o DialOptions) (*Stream, error) {
	req, err := newRequest(target, o)
	if err != nil {
		return nil, err
	}
	key := poolKey{proxyAddr, o.ServerID, o.LocalID, o.Tenant}
	for attempt := 1; ; attempt++ {
		c, err := d.conn(ctx, key, o.TLSConfig)
		if err != nil {
			return nil, fmt.Errorf("hbone: dialing %s via %s: %w", target, proxyAddr, err)
		}
		s, err := roundTrip(ctx, c, req)
		if retryable(err) && attempt < dialRetries {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("hbone: dialing %s via %s: %w", target, proxyAddr, err)
		}
		return s, nil
	}
}

// retryable reports errors that prove the proxy never acted on the CONNECT: a refused stream,
// or a pooled connection that died before any response.
func retryable(err error) bool {
	var re *ResetError
	return errors.As(err, &re) && re.Code == http2.ErrCodeRefusedStream || errors.Is(err, ErrConnClosed)
}

func newRequest(target string, o DialOptions) (*Request, error) {
	if o.TLSConfig == nil {
		return nil, errors.New("hbone: DialOptions.TLSConfig is required")
	}
	t, err := ParseTarget(target)
	if err != nil {
		return nil, err
	}
	return &Request{Target: t, Forwarded: o.Forwarded, Baggage: o.Baggage, Traceparent: o.Traceparent, Header: o.Header}, nil
}

// roundTrip opens a stream on c and waits for the response.
func roundTrip(ctx context.Context, c *conn, req *Request) (*Stream, error) {
	s, err := c.openStream(req)
	if err != nil {
		return nil, err
	}
	select {
	case <-s.respCh: // set by openStream, on this goroutine
	case <-ctx.Done():
		s.Reset(http2.ErrCodeCancel)
		return nil, ctx.Err()
	}
	c.mu.Lock()
	s.respCh = nil // responded is set: nothing closes it again, and an open stream need not keep it
	c.mu.Unlock()
	if s.status == 0 {
		c.mu.Lock()
		err := s.werr
		c.mu.Unlock()
		return nil, err
	}
	if s.status != http.StatusOK {
		s.Close()
		return nil, &StatusError{Code: int(s.status)}
	}
	return s, nil
}

// conn returns a pooled connection with a stream slot reserved, dialing one if needed.
func (d *Dialer) conn(ctx context.Context, key poolKey, tlsCfg *tls.Config) (*conn, error) {
	limit := d.Config.withDefaults(false).MaxConcurrentStreams
	for {
		d.mu.Lock()
		if d.closed {
			d.mu.Unlock()
			return nil, errors.New("hbone: dialer closed")
		}
		if d.pools == nil {
			d.pools = map[poolKey]*pool{}
			d.all = map[*conn]struct{}{}
		}
		p := d.pools[key]
		if p == nil {
			p = &pool{}
			d.pools[key] = p
		}
		for _, c := range p.conns {
			if c.reserve(limit) {
				d.mu.Unlock()
				return c, nil
			}
		}
		call := p.dialing
		if call == nil {
			call = &dialCall{done: make(chan struct{})}
			p.dialing = call
			d.wg.Add(1)
			go d.dial(key, tlsCfg, p, call)
		}
		d.mu.Unlock()
		select {
		case <-call.done:
			if call.err != nil {
				return nil, call.err
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// dial opens one pooled connection on behalf of every caller waiting for key. It is bounded by
// the handshake timeout, not by any one caller's context.
func (d *Dialer) dial(key poolKey, tlsCfg *tls.Config, p *pool, call *dialCall) {
	defer d.wg.Done()
	cfg := d.Config.withDefaults(false)
	ctx, cancel := context.WithTimeout(context.Background(), cfg.HandshakeTimeout)
	defer cancel()
	c, err := d.connect(ctx, key.addr, tlsCfg, cfg, func(c *conn) { d.forget(key, c) })
	d.mu.Lock()
	p.dialing = nil
	var discard *conn
	if err == nil && d.closed {
		err = errors.New("hbone: dialer closed")
		discard = c
	} else if err == nil {
		p.conns = append(p.conns, c)
		d.all[c] = struct{}{}
	}
	call.err = err
	d.mu.Unlock()
	if discard != nil {
		discard.close(nil) // outside d.mu: close calls forget, which takes it
	}
	close(call.done)
	if err == nil {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := c.readLoop(); err != nil {
				d.log().Debug("hbone: client connection ended", "proxy", key.addr, "err", err)
			}
		}()
	}
}

// forget drops c from its pool; it is called when c closes or receives GOAWAY.
func (d *Dialer) forget(key poolKey, c *conn) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p := d.pools[key]; p != nil {
		for i, pc := range p.conns {
			if pc == c {
				p.conns = append(p.conns[:i], p.conns[i+1:]...)
				break
			}
		}
		if len(p.conns) == 0 && p.dialing == nil {
			delete(d.pools, key)
		}
	}
	if !c.usable() || c.closeErr() != nil {
		select {
		case <-c.done:
			delete(d.all, c)
		default:
		}
	}
}

// connect dials TCP, runs the TLS handshake and starts HTTP/2 on it.
func (d *Dialer) connect(ctx context.Context, addr string, tlsCfg *tls.Config, cfg Config, onClose func(*conn)) (*conn, error) {
	dial := d.NetDial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	nc, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return startClient(ctx, nc, tlsCfg, cfg, d.log(), onClose)
}

// startClient runs the client TLS handshake on nc, checks ALPN, starts HTTP/2 and waits for the
// server's SETTINGS: a TLS 1.3 server refuses our certificate only after our side of the
// handshake returned, so that first read is where a refusal shows. The caller runs readLoop.
func startClient(ctx context.Context, nc net.Conn, tlsCfg *tls.Config, cfg Config, log *slog.Logger, onClose func(*conn)) (*conn, error) {
	wire := newWireConn(nc)
	tc := tls.Client(wire, clientTLS(tlsCfg))
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, fmt.Errorf("TLS handshake with %s: %w", nc.RemoteAddr(), err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != http2.NextProtoTLS {
		tc.Close()
		return nil, fmt.Errorf("negotiating ALPN with %s: got %q, want h2", nc.RemoteAddr(), p)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(cfg.HandshakeTimeout)
	}
	tc.SetDeadline(deadline)
	if _, err := tc.Write([]byte(http2.ClientPreface)); err != nil {
		tc.Close()
		return nil, fmt.Errorf("writing the HTTP/2 preface to %s: %w", nc.RemoteAddr(), err)
	}
	c := newConn(tc, wire, false, cfg, log)
	c.peerID = peerID(tc.ConnectionState().PeerCertificates)
	c.onClose = onClose
	c.start()
	if err := c.readSettings(); err != nil {
		c.close(err)
		<-c.writerDone
		return nil, fmt.Errorf("TLS handshake with %s: reading the server's SETTINGS: %w", nc.RemoteAddr(), err)
	}
	tc.SetDeadline(time.Time{})
	return c, nil
}

func clientTLS(cfg *tls.Config) *tls.Config {
	cfg = cfg.Clone()
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{http2.NextProtoTLS}
	return cfg
}

func (d *Dialer) log() *slog.Logger {
	if d.Logger != nil {
		return d.Logger
	}
	return slog.Default()
}

// DialDouble opens a stream to target through a gateway (double HBONE, as used across networks):
// an outer CONNECT to outerTarget (service-hostname:port) through gatewayAddr, then mutual TLS with
// inner.TLSConfig and an inner CONNECT to target over that stream. The inner connection is not
// pooled: closing the returned stream closes it and the outer stream.
func (d *Dialer) DialDouble(ctx context.Context, gatewayAddr, outerTarget string, outer DialOptions, target string, inner DialOptions) (*Stream, error) {
	req, err := newRequest(target, inner)
	if err != nil {
		return nil, err
	}
	os, err := d.Dial(ctx, gatewayAddr, outerTarget, outer)
	if err != nil {
		return nil, err
	}
	cfg := d.Config.withDefaults(false)
	c, err := startClient(ctx, os, inner.TLSConfig, cfg, d.log(), nil)
	if err != nil {
		os.Close()
		return nil, fmt.Errorf("hbone: inner HBONE to %s: %w", target, err)
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		c.readLoop()
	}()
	s, err := roundTrip(ctx, c, req)
	if err != nil {
		c.close(nil)
		return nil, fmt.Errorf("hbone: inner CONNECT to %s: %w", target, err)
	}
	s.onClose = func() { c.closeAfterFlush(nil) }
	return s, nil
}

// Close closes every pooled connection, failing their streams, and waits for their goroutines.
func (d *Dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	var conns []*conn
	for c := range d.all {
		conns = append(conns, c)
	}
	d.mu.Unlock()
	for _, c := range conns {
		c.close(nil)
	}
	d.wg.Wait()
	return nil
}
