package hbone

import (
	"context"
	"fmt"
	"net"
	"time"
)

// DefaultDialTimeout bounds a Forwarder's upstream dial.
const DefaultDialTimeout = 5 * time.Second

// Forwarder is a Handler that dials each stream's target over TCP, accepts the stream only once
// that dial succeeded, and splices the two. It is what a plain HBONE endpoint does (ztunnel's
// inbound); the waypoint's routing lives in proxy/.
type Forwarder struct {
	// Dial opens the upstream connection; nil means a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// DialTimeout bounds Dial; 0 means DefaultDialTimeout.
	DialTimeout time.Duration
	// Authorize, if set, decides whether the stream may proceed; an error wrapping ErrForbidden
	// answers 403.
	Authorize func(*Request) error
	// HalfCloseTimeout: see Splice. 0 means DefaultHalfCloseTimeout.
	HalfCloseTimeout time.Duration
}

func (f *Forwarder) ServeHBONE(s *Stream) error {
	up, err := f.connect(s)
	if err != nil {
		return err
	}
	if err := s.Accept(); err != nil {
		up.Close()
		return err
	}
	return Splice(s, up, f.HalfCloseTimeout)
}

// connect authorizes the stream and dials its target. It is apart from ServeHBONE, whose frame
// stays under the parked handler's stack for the stream's whole life: a small frame there keeps
// that stack within what the GC shrinks an idle handler's stack to (BENCHMARKS.md, issue 21
// goal 4, second step).
//
//go:noinline
func (f *Forwarder) connect(s *Stream) (net.Conn, error) {
	req := s.Request()
	if f.Authorize != nil {
		if err := f.Authorize(req); err != nil {
			return nil, err
		}
	}
	timeout := f.DialTimeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	dial := f.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	ctx, cancel := context.WithTimeout(s.Context(), timeout)
	up, err := dial(ctx, "tcp", req.Target.String())
	cancel()
	if err != nil {
		return nil, fmt.Errorf("hbone: dialing %s: %w", req.Target, err)
	}
	return up, nil
}
