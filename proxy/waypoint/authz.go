package waypoint

import (
	"fmt"
	"net/netip"
	"strings"

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
// address (remoteIpBlocks, remote.ip) of an HTTP request is the rightmost X-Forwarded-For entry,
// as Envoy's (use_remote_address false, no trusted hops), else the peer.
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
		req.RemoteIP = lastForwardedFor(hr.Header)
	}
	return req
}

// lastForwardedFor is the rightmost address of X-Forwarded-For (Envoy's trusted client address
// with no trusted hops); zero when absent or not an IP.
func lastForwardedFor(h map[string][]string) netip.Addr {
	vs := h["X-Forwarded-For"]
	if len(vs) == 0 {
		return netip.Addr{}
	}
	last := vs[len(vs)-1]
	if i := strings.LastIndexByte(last, ','); i >= 0 {
		last = last[i+1:]
	}
	ip, err := netip.ParseAddr(strings.TrimSpace(last))
	if err != nil {
		return netip.Addr{}
	}
	return ip.Unmap()
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
