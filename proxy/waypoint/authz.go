package waypoint

import (
	"fmt"
	"net"
	"net/http"
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
	if ap, ok := addrPort(r.RemoteAddr); ok {
		req.SourceIP = ap.Addr().Unmap()
	}
	if hr != nil {
		req.RemoteIP = authz.RemoteIP(hr.Header.Values("X-Forwarded-For"), h.NumTrustedProxies)
	}
	return req
}

// addrPort is a's address and port, as a.String() parsed; without formatting and parsing it
// when a is a TCP address (net.TCPAddr.String was 5% of the waypoint's CPU per gRPC call,
// BENCHMARKS.md).
func addrPort(a net.Addr) (netip.AddrPort, bool) {
	switch a := a.(type) {
	case nil:
		return netip.AddrPort{}, false
	case *net.TCPAddr: // a 16-byte IPv4 address prints (and so parsed) as IPv4: unmapped
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	}
	ap, err := netip.ParseAddrPort(a.String())
	return ap, err == nil
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

// authorizeCustom is authorize for a stream, asking a CUSTOM policy's provider with check first
// (see custom); a denial by the provider is a *customDenial. An HTTP request is decided in
// phases instead (httpStream.authorizeHTTP).
func (h *Handler) authorizeCustom(engine *authz.Engine, req *authz.Request, r *hbone.Request, check ask) error {
	if engine == nil {
		return nil
	}
	return h.settle(req, r, engine.Decide(req), check)
}

// settle asks the provider dec's CUSTOM policy names with check (see custom); if it allows, the
// DENY and ALLOW policies' decision (Custom.Then) applies. It records the decision and returns
// the denial, if any.
func (h *Handler) settle(req *authz.Request, r *hbone.Request, dec authz.Decision, check ask) error {
	var denied *customDenial
	if c := dec.Custom; c != nil {
		allow, reason, d := h.custom(req, c, check)
		if allow {
			dec.Allow, dec.Policy, dec.Reason = c.Then.Allow, c.Then.Policy, c.Then.Reason+reason
		} else if denied = d; reason != "" {
			dec.Reason = reason
		}
	}
	return h.conclude(req, r, dec, denied)
}

// conclude records dec (metrics, the dry-run and audit log) and returns its denial: denied when
// the provider answered it, else Envoy's RBAC one.
func (h *Handler) conclude(req *authz.Request, r *hbone.Request, dec authz.Decision, denied *customDenial) error {
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

// authorizeHTTP runs the policy phases of one HTTP request in the order of istiod's waypoint
// chain (pilot listener_waypoint.go buildWaypointHTTPFilters; the sidecar's inbound chain is the
// same): the CUSTOM policies' ext_authz check (authzCustomBuilder), then request authentication
// (authnBuilder: jwt_authn), then AUDIT, DENY and ALLOW (authzBuilder). The CUSTOM rules are
// matched before any token is validated, as Envoy's shadow RBAC filter in front of ext_authz
// sees no jwt_authn metadata: a token takes no part in whether the provider is asked, and a
// request it denies gets the provider's answer whatever its token; one it allows then has its
// token validated (401 when it fails) and the DENY and ALLOW policies decide on the request
// as the provider changed it. It answers a refused request itself and reports whether r goes on.
func (hs *httpStream) authorizeHTTP(w http.ResponseWriter, r *http.Request, grpc bool, dest *route.Destination, hr *authz.HTTPRequest) bool {
	h := hs.h
	var engine *authz.Engine
	if h.Policies != nil {
		engine = h.Policies()
	}
	req := h.authzRequest(hs.req, dest, "", hr) // req.HTTP is hr: it gets the token below
	var custom authz.Decision
	var note string
	if engine != nil {
		custom = engine.DecideCustom(req)
		var denied *customDenial
		if c := custom.Custom; c != nil {
			var reason string
			if custom.Allow, reason, denied = h.custom(req, c, hs.checkHTTP(w, r)); custom.Allow {
				note = reason
			} else if reason != "" {
				custom.Reason = reason
			}
		}
		if !custom.Allow {
			deny(w, grpc, h.conclude(req, hs.req, custom, denied))
			return false
		}
	}
	if !hs.authenticate(w, r, grpc, dest, hr) {
		return false // answered: a token failed (401), before DENY and ALLOW, as Envoy's jwt_authn
	}
	if engine == nil {
		return true
	}
	dec := engine.DecideLocal(req)
	dec.DryRun = append(custom.DryRun, dec.DryRun...)
	dec.Reason += note
	if err := h.conclude(req, hs.req, dec, nil); err != nil {
		deny(w, grpc, err)
		return false
	}
	return true
}
