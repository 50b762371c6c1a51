package waypoint

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

// authzRequest gathers what a policy can look at: the peer identity, the original source
// (Forwarded), the destination, and, when the stream was inspected, its SNI or HTTP request.
func (h *Handler) authzRequest(r *hbone.Request, d *route.Destination, sni string, hr *authz.HTTPRequest) *authz.Request {
	req := &authz.Request{
		Principal: strings.TrimPrefix(r.PeerID.String(), "spiffe://"),
		DestIP:    r.Target.Addr.Addr(),
		DestPort:  r.Target.Addr.Port(),
		Service:   authzService(d),
		SNI:       sni,
		HTTP:      hr,
	}
	if src, ok := r.OriginalSource(); ok {
		req.SourceIP = src.Addr()
	} else if ap, err := netip.ParseAddrPort(r.RemoteAddr.String()); err == nil {
		req.SourceIP = ap.Addr()
	}
	return req
}

func authzService(d *route.Destination) authz.Service {
	if d.Service == nil {
		return authz.Service{}
	}
	return authz.Service{Namespace: d.Service.Namespace, Name: d.Service.Name}
}

// authorize decides req with engine (nil allows) and records the decision; a denial is an error
// wrapping hbone.ErrForbidden ("RBAC: access denied", as Envoy says it).
func (h *Handler) authorize(engine *authz.Engine, req *authz.Request, r *hbone.Request) error {
	if engine == nil {
		return nil
	}
	dec := engine.Decide(req)
	h.Metrics.Decision(dec.Allow, dec.Policy)
	if len(dec.Audit) > 0 {
		h.log().Info("authz: audit", "policies", dec.Audit, "principal", req.Principal, "target", r.Target.String(), "decision", dec.String())
	}
	if !dec.Allow {
		return fmt.Errorf("%w: RBAC: access denied: %s", hbone.ErrForbidden, dec.Reason)
	}
	return nil
}
