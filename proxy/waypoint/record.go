package waypoint

import (
	"net/netip"
	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/sniff"
)

// streamRecord is one opaque stream's result tracker (ztunnel's result_tracker): opened once the
// stream is answered, closed with its byte counts and error, and the one source of its metrics
// and access-log line, whether the service's endpoint or a developer (upstream "developer") took
// it. A session's event comes from the same counts (session.Take).
type streamRecord struct {
	h        *Handler
	labels   metrics.Stream
	proto    sniff.Protocol
	target   string
	upstream string
	start    time.Time
}

func (h *Handler) openRecord(req *hbone.Request, dest *route.Destination, proto sniff.Protocol, upstream string) *streamRecord {
	labels := h.streamLabels(req, dest)
	if ep, err := netip.ParseAddrPort(upstream); err == nil && dest.Service != nil {
		labels = h.withEndpoint(labels, dest, ep)
	}
	r := &streamRecord{h: h, labels: labels, proto: proto, target: req.Target.String(), upstream: upstream, start: time.Now()}
	h.Metrics.StreamOpened(r.labels)
	return r
}

func (r *streamRecord) close(c hbone.Counts, err error) {
	r.h.Metrics.StreamClosed(r.labels, c.AToB, c.BToA)
	if al := r.h.AccessLog; al != nil {
		al.Info("stream", "protocol", r.proto.String(), "source", authz.Principal(r.labels.Source.Principal), "target", r.target,
			"service", r.labels.Service, "upstream", r.upstream, "received", c.AToB, "sent", c.BToA,
			"duration_ms", time.Since(r.start).Milliseconds(), "err", errString(err))
	}
}
