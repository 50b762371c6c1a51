package hbone

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ClientConn is one HBONE client connection over a net.Conn the caller already holds, with no
// pooling. It serves reversed tunnels: the side that accepted the TCP connection runs the TLS
// client and opens the streams (detour's developer tunnel over HTTP/2 does this, since an HTTP/2
// server cannot open streams).
type ClientConn struct {
	c    *conn
	done chan struct{} // closed when the reader has exited
}

// NewClientConn runs the TLS client handshake on nc (with tlsCfg: TLS 1.3 and ALPN h2 are
// enforced), starts HTTP/2 and waits for the peer's SETTINGS. The zero cfg means ztunnel's
// settings; a nil log means slog.Default(). It owns nc from here on, also on error.
func NewClientConn(ctx context.Context, nc net.Conn, tlsCfg *tls.Config, cfg Config, log *slog.Logger) (*ClientConn, error) {
	if log == nil {
		log = slog.Default()
	}
	c, err := startClient(ctx, nc, tlsCfg, cfg.withDefaults(false), log, nil)
	if err != nil {
		return nil, err
	}
	cc := &ClientConn{c: c, done: make(chan struct{})}
	go func() {
		defer close(cc.done)
		if err := c.readLoop(); err != nil {
			log.Debug("hbone: client connection ended", "peer", nc.RemoteAddr(), "err", err)
		}
	}()
	return cc, nil
}

// Dial opens a stream to target and waits for the 200; DialOptions.TLSConfig and the identities
// are ignored (the connection is already up).
func (cc *ClientConn) Dial(ctx context.Context, target string, o DialOptions) (*Stream, error) {
	t, err := ParseTarget(target)
	if err != nil {
		return nil, err
	}
	req := &Request{Target: t, Forwarded: o.Forwarded, Baggage: o.Baggage, Traceparent: o.Traceparent, Header: o.Header}
	s, err := roundTrip(ctx, cc.c, req)
	if err != nil {
		return nil, fmt.Errorf("hbone: dialing %s: %w", target, err)
	}
	return s, nil
}

// PeerID is the peer's verified SPIFFE ID (zero if it presented none).
func (cc *ClientConn) PeerID() spiffeid.ID { return cc.c.peerID }

// Done is closed once the connection is gone (closed by either side, or its keepalive failed).
func (cc *ClientConn) Done() <-chan struct{} { return cc.done }

// Close closes the connection and its streams and waits for its reader.
func (cc *ClientConn) Close() error {
	cc.c.close(nil)
	<-cc.done
	return nil
}
