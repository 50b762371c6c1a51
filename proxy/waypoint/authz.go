package waypoint

import (
	"fmt"
	"net/netip"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

// authzRequest gathers what a policy can look at: the peer identity, the source address, the
// destination, and, when the stream was inspected, its SNI or HTTP request.
//
// The source address (ipBlocks, source.ip) is the connection's peer, as ztunnel's RBAC takes
// conn.src and Envoy's waypoint direct_remote_ip: ztunnel connects from the client pod's own
// address. Forwarded is the client's to write, so it is carried on but never judged. The remote
// address (remoteIpBlocks, remote.ip) of an HTTP request is X-Forwarded-For's entry
// NumTrustedProxies from the right, as Envoy's (use_remote_address false, xff_num_trusted_hops),
// else the peer.
func (h *Handler) authzRequest(r *hbone.Request, d *route.Destination, sni string, hr *authz.HTTPRequest) *authz.Request {
	req := &authz.Request{
		Principal: authz.Principal(r.PeerID.String()),
		DestIP:    r.Target.Addr.Addr(),
		DestPort:  r.Target.Addr.Port(),
		Service:   authzService(d),
		SNI:       sni,
		HTTP:      hr,
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr.String()); err == nil {
		req.SourceIP = ap.Addr().Unmap()
	}
	if hr != nil {
		req.RemoteIP = authz.RemoteIP(hr.Header.Values("X-Forwarded-For"), h.NumTrustedProxies)
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
	return h.authorizeCustom(engine, req, r, nil)
}

// authorizeCustom is authorize, asking a CUSTOM policy's provider with check first (see
// custom); a denial by the provider is a *customDenial.
func (h *Handler) authorizeCustom(engine *authz.Engine, req *authz.Request, r *hbone.Request, check ask) error {
	if engine == nil {
		return nil
	}
	return h.settle(engine, req, r, engine.Decide(req), check)
}

// settle asks the provider dec's CUSTOM policy names with check (see custom), records the
// decision and returns the denial, if any.
func (h *Handler) settle(engine *authz.Engine, req *authz.Request, r *hbone.Request, dec authz.Decision, check ask) error {
	var denied *customDenial
	if dec.Custom != nil {
		dec, denied = h.custom(engine, req, dec, check)
	}
	h.Metrics.Decision(dec.Allow, dec.Policy)
	for _, d := range dec.DryRun {
		h.Metrics.ShadowDecision(d)
	}
	if len(dec.DryRun) > 0 {
		h.log().Info("authz: dry run", "policies", dec.DryRun, "principal", req.Principal, "target", r.Target.String(), "enforced", dec.String())
	}
	if len(dec.Audit) > 0 {
		h.log().Info("authz: audit", "policies", dec.Audit, "principal", req.Principal, "target", r.Target.String(), "decision", dec.String())
	}
	if denied != nil {
		return denied
	}
	if !dec.Allow {
		return fmt.Errorf("%w: RBAC: access denied: %s", hbone.ErrForbidden, dec.Reason)
	}
	return nil
}
