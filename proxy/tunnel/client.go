package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
)

// Tunnel is the developer's end of a tunnel.
type Tunnel struct {
	control net.Conn
	accept  func(ctx context.Context) (net.Conn, error)
	done    <-chan struct{}
	close   func() error
}

// Dial connects to the waypoint's tunnel listener at addr over transport (quic or h2),
// presenting src's SVID and accepting a waypoint that authorize accepts (nil: any member of the
// trust domain).
func Dial(ctx context.Context, transport, addr string, src identity.Source, authorize tlsconfig.Authorizer, log *slog.Logger) (*Tunnel, error) {
	if log == nil {
		log = slog.Default()
	}
	switch transport {
	case "quic":
		return dialQUIC(ctx, addr, src, authorize)
	case "h2":
		return dialH2(ctx, addr, src, authorize, log)
	}
	return nil, fmt.Errorf("tunnel: transport %q is not quic or h2", transport)
}

func dialQUIC(ctx context.Context, addr string, src identity.Source, authorize tlsconfig.Authorizer) (*Tunnel, error) {
	tlsCfg := identity.ClientTLSAuthorized(src, authorize).Clone()
	tlsCfg.NextProtos = []string{ALPN}
	c, err := quic.DialAddr(ctx, addr, tlsCfg, quicConfig())
	if err != nil {
		if noAnswer(err) {
			return nil, fmt.Errorf("tunnel: dialing %s over QUIC: %w (%w)", addr, ErrNoAnswer, err)
		}
		return nil, fmt.Errorf("tunnel: dialing %s over QUIC: %w", addr, err)
	}
	ctl, err := c.OpenStreamSync(ctx)
	if err != nil {
		c.CloseWithError(0, "")
		return nil, fmt.Errorf("tunnel: opening the control stream: %w", err)
	}
	return &Tunnel{
		control: quicConn(c, ctl),
		accept: func(ctx context.Context) (net.Conn, error) {
			st, err := c.AcceptStream(ctx)
			if err != nil {
				return nil, err
			}
			return quicConn(c, st), nil
		},
		done:  c.Context().Done(),
		close: func() error { return c.CloseWithError(0, "") },
	}, nil
}

// ErrNoAnswer: a QUIC dial got no answer before its context ended or its handshake timed out
// (UDP may be blocked on the way).
var ErrNoAnswer = errors.New("no answer over UDP")

func noAnswer(err error) bool {
	var idle *quic.IdleTimeoutError
	var hs *quic.HandshakeTimeoutError
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &idle) || errors.As(err, &hs)
}

// dialH2 dials TCP and serves TLS and HTTP/2 on it; the waypoint opens the streams.
func dialH2(ctx context.Context, addr string, src identity.Source, authorize tlsconfig.Authorizer, log *slog.Logger) (*Tunnel, error) {
	nc, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("tunnel: dialing %s: %w", addr, err)
	}
	streams := make(chan *handedStream)
	control := make(chan *handedStream, 1)
	var first atomic.Bool
	done := make(chan struct{})
	srv := &hbone.Server{
		TLSConfig: identity.ServerTLS(src, authorize),
		Config:    hbone.Config{PingInterval: KeepaliveInterval, PingTimeout: DeadAfter},
		Logger:    log,
		Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
			if err := s.Accept(); err != nil {
				return err
			}
			hs := &handedStream{Stream: s, closed: make(chan struct{})}
			if s.Request().Target.String() == controlTarget {
				if !first.CompareAndSwap(false, true) {
					return errors.New("tunnel: a second control stream")
				}
				control <- hs
			} else {
				select {
				case streams <- hs:
				case <-done:
					return nil
				}
			}
			select { // the server closes the stream when this returns
			case <-hs.closed:
			case <-done:
			}
			return nil
		}),
	}
	go func() {
		srv.ServeConn(context.Background(), nc)
		close(done)
	}()
	var ctl *handedStream
	select {
	case ctl = <-control:
	case <-done:
		return nil, fmt.Errorf("tunnel: %s closed the tunnel during setup (identity refused?)", addr)
	case <-ctx.Done():
		srv.Close()
		return nil, fmt.Errorf("tunnel: waiting for %s to open the control stream: %w", addr, ctx.Err())
	}
	return &Tunnel{
		control: ctl,
		accept: func(ctx context.Context) (net.Conn, error) {
			select {
			case s := <-streams:
				return s, nil
			case <-done:
				return nil, errors.New("tunnel: closed")
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		},
		done:  done,
		close: func() error { srv.Close(); <-done; return nil },
	}, nil
}

// handedStream is a stream handed from the HTTP/2 server's handler to the consumer; Close tells
// the handler it may return.
type handedStream struct {
	*hbone.Stream
	once   sync.Once
	closed chan struct{}
}

func (h *handedStream) Close() error {
	err := h.Stream.Close()
	h.once.Do(func() { close(h.closed) })
	return err
}

// Control is the control stream: send the Hello, read the Reply, then Events.
func (t *Tunnel) Control() net.Conn { return t.control }

// Accept waits for the next data stream and reads its Meta. The caller answers with AckStream
// once it connected the stream (or failed to).
func (t *Tunnel) Accept(ctx context.Context) (Meta, net.Conn, error) {
	c, err := t.accept(ctx)
	if err != nil {
		return Meta{}, nil, err
	}
	var m Meta
	if err := ReadMsg(c, &m); err != nil {
		c.Close()
		return Meta{}, nil, err
	}
	return m, c, nil
}

// Done is closed when the tunnel is gone.
func (t *Tunnel) Done() <-chan struct{} { return t.done }

// Close ends the tunnel; the waypoint ends its sessions.
func (t *Tunnel) Close() error { return t.close() }

// Forward connects each data stream to the developer's app at addr until the tunnel ends or ctx
// is done; seen, if set, is told of each stream. See Forwarder.
func (t *Tunnel) Forward(ctx context.Context, addr string, seen func(Meta, error)) error {
	return (&Forwarder{Addr: addr, Seen: seen}).Serve(ctx, t)
}

// Forwarder is the developer's side of the data streams: probes answered at once, the egress
// link (Meta kind hbone) handed to Egress, every other stream acknowledged once connected to the
// app at Addr and spliced with it. A stream whose app connection fails is refused in its Ack (the
// waypoint sends the traffic to the real service).
type Forwarder struct {
	Addr string
	// Seen, if set, is told of each stream to the app and how its connection went.
	Seen func(Meta, error)
	// Egress, if set, serves the egress link (acknowledged first) until ctx ends; nil refuses it.
	Egress func(ctx context.Context, c net.Conn)
}

// Serve forwards t's data streams until the tunnel ends or ctx is done, then waits for the
// streams it started.
func (f *Forwarder) Serve(ctx context.Context, t *Tunnel) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		m, c, err := t.Accept(ctx)
		if err != nil {
			select {
			case <-t.done:
				return nil
			default:
			}
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		switch {
		case m.Kind == KindProbe:
			AckProbe(c)
		case m.Kind == KindHBONE && f.Egress == nil:
			AckStream(c, errors.New("this CLI asked for no egress link"))
			c.Close()
		case m.Kind == KindHBONE:
			if AckStream(c, nil) != nil {
				c.Close()
				continue
			}
			wg.Go(func() { f.Egress(ctx, c) })
		default:
			wg.Go(func() { f.app(ctx, m, c) })
		}
	}
}

// app connects one data stream to the app and splices the two.
func (f *Forwarder) app(ctx context.Context, m Meta, c net.Conn) {
	app, err := (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, "tcp", f.Addr)
	if f.Seen != nil {
		f.Seen(m, err)
	}
	if AckStream(c, err) != nil || err != nil {
		c.Close()
		if app != nil {
			app.Close()
		}
		return
	}
	hbone.Splice(c, app, 0)
}

// AckProbe answers a probe stream (the waypoint asks whether this side is there; the app is not
// involved) and closes it. The Ack is the stream's first bytes, well within any window; the write
// is bounded anyway.
func AckProbe(c net.Conn) {
	c.SetWriteDeadline(time.Now().Add(time.Second))
	AckStream(c, nil)
	c.Close()
}

// AckStream answers a data stream's Meta: connected (err nil) or not.
func AckStream(c net.Conn, err error) error {
	if err != nil {
		return WriteMsg(c, Ack{Error: err.Error()})
	}
	return WriteMsg(c, Ack{OK: true})
}
