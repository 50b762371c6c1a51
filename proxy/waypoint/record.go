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
// it, or the waypoint refused it (response flags set). A session's event comes from the same
// counts (session.Take).
type streamRecord struct {
	h   *Handler
	end metrics.StreamEnd
	req *hbone.Request // its target, for the access log
	// For the access log: an open stream keeps only these of its labels.
	principal, service, flags string
	proto                     sniff.Protocol
	upstream                  string
	start                     time.Time
}

func (h *Handler) openRecord(req *hbone.Request, dest *route.Destination, proto sniff.Protocol, upstream string) *streamRecord {
	labels := h.streamLabels(req, dest)
	if ep, err := netip.ParseAddrPort(upstream); err == nil && dest.Service != nil {
		labels = h.withEndpoint(labels, dest, ep)
	}
	return h.open(req, labels, proto, upstream)
}

func (h *Handler) open(req *hbone.Request, labels metrics.Stream, proto sniff.Protocol, upstream string) *streamRecord {
	return &streamRecord{h: h, end: h.Metrics.StreamOpened(labels), req: req,
		principal: labels.Source.Principal, service: labels.Service, flags: labels.Flags,
		proto: proto, upstream: upstream, start: time.Now()}
}

// refused records a stream to dest the waypoint refuses itself, with Envoy's response flags
// (as Envoy's waypoint counts a connection its tcp_proxy closes without an upstream: opened and
// closed, nothing carried, the flag on both), and its access-log line; it returns err.
func (h *Handler) refused(req *hbone.Request, dest *route.Destination, proto sniff.Protocol, flags string, err error) error {
	labels := h.streamLabels(req, dest)
	labels.Flags = flags
	h.open(req, labels, proto, "").close(hbone.Counts{}, err)
	return err
}

func (r *streamRecord) close(c hbone.Counts, err error) {
	r.end.Closed(c.AToB, c.BToA)
	if al := r.h.AccessLog; al != nil {
		flags := r.flags
		if flags == "" {
			flags = "-"
		}
		al.Info("stream", "protocol", r.proto.String(), "source", authz.Principal(r.principal), "target", r.req.Target.String(),
			"service", r.service, "upstream", r.upstream, "received", c.AToB, "sent", c.BToA,
			"duration_ms", time.Since(r.start).Milliseconds(), "flags", flags, "err", errString(err))
	}
}
