package waypoint

import (
	"net/netip"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
)

// streamLabels names a stream for Istio's metrics: its source (the verified peer identity, and
// the pod at the connection's peer address, as Envoy's waypoint finds its downstream peer by
// address in workload discovery; ztunnel connects from the client pod's own address) and the
// service it was addressed to. The destination workload is added once an endpoint is chosen.
func (h *Handler) streamLabels(req *hbone.Request, dest *route.Destination) metrics.Stream {
	l := metrics.Stream{Source: metrics.Peer{Principal: req.PeerID.String()}}
	if req.RemoteAddr == nil {
		// hand-built requests only
	} else if ap, err := netip.ParseAddrPort(req.RemoteAddr.String()); err == nil {
		if w := h.Routes().Workload(ap.Addr()); w != nil {
			l.Source = peer(w, l.Source.Principal)
		}
	}
	if s := dest.Service; s != nil {
		l.Service, l.ServiceName, l.ServiceNamespace = s.Hostname, s.Name, s.Namespace
	}
	return l
}

// withEndpoint is l with the destination workload at ep (the endpoint that served the stream or
// request) and the identity its ztunnel presented.
func (h *Handler) withEndpoint(l metrics.Stream, dest *route.Destination, ep netip.AddrPort) metrics.Stream {
	var principal string
	if dest.Service != nil {
		if id, err := h.endpointID(dest, ep); err == nil {
			principal = id.String()
		}
	}
	l.Destination = metrics.Peer{Principal: principal}
	if w := h.Routes().Workload(ep.Addr()); w != nil {
		l.Destination = peer(w, principal)
	}
	return l
}

func peer(w *route.Workload, principal string) metrics.Peer {
	return metrics.Peer{Workload: w.Name, Namespace: w.Namespace, Principal: principal, App: w.App, Version: w.Version,
		CanonicalService: w.CanonicalService, CanonicalRevision: w.CanonicalRevision, Cluster: w.Cluster}
}
