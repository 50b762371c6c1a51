package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
)

// setupTimeout bounds a new tunnel's handshake and control stream.
const setupTimeout = 10 * time.Second

// Peer is one connected developer, on the waypoint's side.
type Peer struct {
	id        spiffeid.ID
	local     spiffeid.ID // the waypoint's own, when the tunnel was set up
	transport string
	control   net.Conn
	open      func(ctx context.Context) (net.Conn, error)
	rtt       func() time.Duration // the tunnel's smoothed round trip; nil: unknown
	done      <-chan struct{}
	stopping  <-chan struct{} // the server's context's
	close     func() error
}

// Stopping is closed when the server is stopping: a handler that outlives its tunnel (a session
// waiting for its developer to resume it) returns.
func (p *Peer) Stopping() <-chan struct{} { return p.stopping }

// ID is the developer's verified SPIFFE ID.
func (p *Peer) ID() spiffeid.ID { return p.id }

// Local is the waypoint's own SPIFFE ID (what it presented to the developer).
func (p *Peer) Local() spiffeid.ID { return p.local }

// Transport is quic or h2.
func (p *Peer) Transport() string { return p.transport }

// Control is the control stream (Hello in, Reply and Events out).
func (p *Peer) Control() net.Conn { return p.control }

// OpenError: a data stream to the developer could not be opened; nothing reached the developer.
type OpenError struct {
	Peer spiffeid.ID
	Err  error
}

func (e *OpenError) Error() string {
	return fmt.Sprintf("tunnel: opening a stream to %s: %v", e.Peer, e.Err)
}
func (e *OpenError) Unwrap() error { return e.Err }

// Open opens a data stream to the developer, sends m on it and waits for its Ack (the developer
// connected it to the app), all within AckTimeout plus twice the tunnel's round trip: a developer
// whose tunnel just died costs its traffic that wait, not the dead-peer timeout. The bound is on
// the stream's setup only; its data then flows at the developer's pace. Errors are *OpenError:
// nothing of the traffic reached the developer.
func (p *Peer) Open(ctx context.Context, m Meta) (net.Conn, error) {
	select {
	case <-p.done:
		return nil, &OpenError{Peer: p.id, Err: errors.New("the tunnel is gone")}
	default:
	}
	ctx, cancel := context.WithTimeout(ctx, p.ackTimeout())
	defer cancel()
	c, err := p.open(ctx)
	if err != nil {
		return nil, &OpenError{Peer: p.id, Err: err}
	}
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline) // the Meta's write, too, waits no longer
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	if err := WriteMsg(c, m); err != nil {
		c.Close()
		return nil, &OpenError{Peer: p.id, Err: err}
	}
	var ack Ack
	if err := ReadMsg(c, &ack); err != nil {
		c.Close()
		return nil, &OpenError{Peer: p.id, Err: fmt.Errorf("waiting for the developer's acknowledgement: %w", err)}
	}
	if !stop() {
		c.Close() // ctx ended just as the ack came: the deadline is set; give up on the stream
		return nil, &OpenError{Peer: p.id, Err: ctx.Err()}
	}
	c.SetDeadline(time.Time{})
	if !ack.OK {
		c.Close()
		return nil, &OpenError{Peer: p.id, Err: fmt.Errorf("the developer's side: %s", ack.Error)}
	}
	return c, nil
}

func (p *Peer) ackTimeout() time.Duration {
	if p.rtt == nil {
		return AckTimeout
	}
	return AckTimeout + 2*p.rtt()
}

// Done is closed when the tunnel is gone (closed, or silent for DeadAfter).
func (p *Peer) Done() <-chan struct{} { return p.done }

// Close closes the tunnel and every stream on it.
func (p *Peer) Close() error { return p.close() }

// Server accepts developer tunnels for a waypoint.
type Server struct {
	// Identity is the waypoint's; developers must present an SVID of the same trust domain
	// (what they may do is AuthorizationPolicy's call, not the handshake's).
	Identity identity.Source
	// Handler serves one tunnel, in its own goroutine; the tunnel is closed when it returns.
	Handler func(*Peer)
	Logger  *slog.Logger // nil means slog.Default()

	wg sync.WaitGroup
}

// ServeQUIC accepts QUIC tunnels on pc until ctx ends, then closes them and waits for handlers.
func (s *Server) ServeQUIC(ctx context.Context, pc net.PacketConn) error {
	tlsCfg := identity.ServerTLS(s.Identity, nil).Clone()
	tlsCfg.NextProtos = []string{ALPN}
	l, err := quic.Listen(pc, tlsCfg, quicConfig())
	if err != nil {
		return fmt.Errorf("tunnel: listening on %s: %w", pc.LocalAddr(), err)
	}
	defer s.wg.Wait()
	defer l.Close()
	for {
		c, err := l.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("tunnel: accepting: %w", err)
		}
		s.wg.Go(func() {
			stop := context.AfterFunc(ctx, func() { c.CloseWithError(0, "waypoint shutting down") })
			defer stop()
			p, err := quicPeer(ctx, c, s.localID())
			if err != nil {
				s.log().Info("tunnel: refused", "transport", "quic", "remote", c.RemoteAddr().String(), "err", err)
				c.CloseWithError(1, "setup failed")
				return
			}
			defer p.Close()
			s.Handler(p)
		})
	}
}

func quicConfig() *quic.Config {
	return &quic.Config{KeepAlivePeriod: KeepaliveInterval, MaxIdleTimeout: DeadAfter, HandshakeIdleTimeout: setupTimeout}
}

func quicPeer(ctx context.Context, c *quic.Conn, local spiffeid.ID) (*Peer, error) {
	id, err := peerID(c.ConnectionState().TLS)
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	ctl, err := c.AcceptStream(sctx)
	if err != nil {
		return nil, fmt.Errorf("waiting for the control stream: %w", err)
	}
	return &Peer{
		id: id, local: local, transport: "quic", control: quicConn(c, ctl),
		open: func(ctx context.Context) (net.Conn, error) {
			st, err := c.OpenStreamSync(ctx)
			if err != nil {
				return nil, err
			}
			return quicConn(c, st), nil
		},
		rtt:      func() time.Duration { return c.ConnectionStats().SmoothedRTT },
		done:     c.Context().Done(),
		stopping: ctx.Done(),
		close:    func() error { return c.CloseWithError(0, "") },
	}, nil
}

func peerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("the developer presented no certificate")
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}

// ServeTCP accepts HTTP/2 tunnels on l until ctx ends (roles reversed: see the package doc).
func (s *Server) ServeTCP(ctx context.Context, l net.Listener) error {
	defer s.wg.Wait()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("tunnel: accepting: %w", err)
		}
		s.wg.Go(func() {
			p, err := s.h2Peer(ctx, nc)
			if err != nil {
				s.log().Info("tunnel: refused", "transport", "h2", "remote", nc.RemoteAddr().String(), "err", err)
				return
			}
			stop := context.AfterFunc(ctx, func() { p.Close() })
			defer stop()
			defer p.Close()
			s.Handler(p)
		})
	}
}

func (s *Server) h2Peer(ctx context.Context, nc net.Conn) (*Peer, error) {
	sctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	cfg := hbone.Config{PingInterval: KeepaliveInterval, PingTimeout: DeadAfter}
	cc, err := hbone.NewClientConn(sctx, nc, identity.ClientTLSAuthorized(s.Identity, nil), cfg, s.log())
	if err != nil {
		return nil, err
	}
	ctl, err := cc.Dial(sctx, controlTarget, hbone.DialOptions{})
	if err != nil {
		cc.Close()
		return nil, fmt.Errorf("opening the control stream: %w", err)
	}
	return &Peer{
		id: cc.PeerID(), local: s.localID(), transport: "h2", control: ctl,
		open: func(ctx context.Context) (net.Conn, error) {
			return cc.Dial(ctx, "stream.detour.internal:1", hbone.DialOptions{})
		},
		done:     cc.Done(),
		stopping: ctx.Done(),
		close:    cc.Close,
	}, nil
}

// localID is the waypoint's current SPIFFE ID (zero before it has one: no handshake succeeds then).
func (s *Server) localID() spiffeid.ID {
	if own, _ := s.Identity.Identity(); own != nil && own.SVID != nil {
		return own.SVID.ID
	}
	return spiffeid.ID{}
}

func (s *Server) log() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// streamConn is a QUIC stream as a net.Conn: Close ends both directions, CloseWrite sends FIN.
type streamConn struct {
	*quic.Stream
	c *quic.Conn
}

func quicConn(c *quic.Conn, s *quic.Stream) net.Conn { return &streamConn{Stream: s, c: c} }

func (s *streamConn) LocalAddr() net.Addr  { return s.c.LocalAddr() }
func (s *streamConn) RemoteAddr() net.Addr { return s.c.RemoteAddr() }
func (s *streamConn) CloseWrite() error    { return s.Stream.Close() }
func (s *streamConn) Close() error {
	s.Stream.CancelRead(0)
	return s.Stream.Close()
}
