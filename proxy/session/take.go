package session

import (
	"context"
	"errors"
	"net"

	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Take is the one whole-stream steal (the waypoint's, the relay's and the sidecar's): it opens a
// data stream to the developer with m (acknowledged within the tunnel's bound), answers the
// client with accept (a CONNECT's 200; nil when there is nothing to answer), splices c with the
// developer's stream (halfClose: see hbone.Splice) and, for a whole stream (m.Kind tcp), reports
// it to the developer's CLI. handled is false when the developer could not be reached, with the
// reason: nothing was sent to it, and the caller carries the stream as usual. counts are the
// spliced bytes (c to the developer in AToB).
func (s *Session) Take(ctx context.Context, c net.Conn, m tunnel.Meta, accept func() error, halfClose time.Duration) (handled bool, counts hbone.Counts, err error) {
	dev, err := s.Open(ctx, m)
	if err != nil {
		return false, counts, err
	}
	if accept != nil {
		if err := accept(); err != nil {
			dev.Close()
			return true, counts, err
		}
	}
	start := time.Now()
	counts, err = hbone.SpliceCount(c, dev, halfClose)
	if m.Kind == tunnel.KindTCP {
		ev := tunnel.Event{Kind: tunnel.EventStream, Received: counts.AToB, Sent: counts.BToA, Micros: time.Since(start).Microseconds(),
			Source: authz.Principal(m.Source)}
		if err != nil && !errors.Is(err, net.ErrClosed) {
			ev.Error = err.Error()
		}
		s.Report(ev)
	}
	return true, counts, err
}
