package waypoint

import (
	"net"
	"sync"

	"github.com/detour-mesh/detour/hbone"
)

// sniffing counts each client's streams waiting for their first bytes (Handler.MaxSniffing).
// Its zero value is ready; a client's entry lives only while it has streams waiting.
type sniffing struct {
	mu sync.Mutex
	n  map[string]int // owned by mu: waiting streams by clientKey
}

// hold takes a share of req's client for one waiting stream and returns the func that gives it
// back (call it once), or nil when the client already holds MaxSniffing: the stream is refused.
func (s *sniffing) hold(h *Handler, req *hbone.Request) func() {
	key, limit := clientKey(req), h.maxSniffing()
	s.mu.Lock()
	if s.n[key] >= limit {
		s.mu.Unlock()
		h.Metrics.SniffRefusal("limit")
		return nil
	}
	if s.n == nil {
		s.n = map[string]int{}
	}
	s.n[key]++
	s.mu.Unlock()
	h.Metrics.SniffStarted()
	return func() {
		s.mu.Lock()
		if s.n[key]--; s.n[key] <= 0 {
			delete(s.n, key)
		}
		s.mu.Unlock()
		h.Metrics.SniffEnded()
	}
}

func (h *Handler) maxSniffing() int {
	if h.MaxSniffing > 0 {
		return h.MaxSniffing
	}
	return DefaultMaxSniffing
}

// clientKey names the client a stream's share is counted against: its verified identity (in
// ambient mode, ztunnel presents the source workload's), else the address it connected from.
func clientKey(req *hbone.Request) string {
	if !req.PeerID.IsZero() {
		return req.PeerID.String()
	}
	if req.RemoteAddr != nil {
		if host, _, err := net.SplitHostPort(req.RemoteAddr.String()); err == nil {
			return host
		}
		return req.RemoteAddr.String()
	}
	return ""
}
