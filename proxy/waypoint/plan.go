package waypoint

import (
	"cmp"
	"errors"
	"fmt"
	"net"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/sniff"
)

// plan is what the waypoint does with one CONNECT, decided from the request and the current
// tables alone, with no I/O (ztunnel's build_inbound_request): where the stream goes, which
// policies and protocol apply, whether it is inspected, which debug sessions take it, and, for a
// stream that is not inspected, the policy decision itself. Whatever it refuses is refused
// before anything is dialed.
type plan struct {
	req      *hbone.Request
	relay    bool               // a stream another replica relays into a local session; nothing else is set
	dest     *route.Destination // the service and its candidate endpoints (none: a whole steal takes it)
	engine   *authz.Engine      // nil allows everything
	proto    sniff.Protocol     // the port's declared protocol, or TCP until sniffed
	declared bool               // the port declares its protocol
	// inspect: sniffed after the 200; HTTP is served request by request, TLS and TCP are decided
	// with the SNI. Otherwise the decision was taken here, at CONNECT time.
	inspect bool
	steal   *session.Session   // the whole-stream steal, if any
	mirrors []*session.Session // the whole-stream mirrors
	check   *pendingCheck      // a CUSTOM policy's provider to ask before the stream is dialed
	// l4 are the TCPRoutes and TLSRoutes of the addressed port (nil: none). Decided at CONNECT
	// (a stream not inspected), route is the backend they drew and its sessions, or their
	// refusal, carried out once the addressed service's whole-stream steal did not take the
	// stream (its sessions come before its routes). An inspected stream is routed once sniffed.
	l4    *l4route.Routes
	route l4Choice
	// endSniff gives back the stream's share of its client's sniffing streams (nil: none held).
	endSniff func()
}

// sniffs says whether the stream waits for its client's bytes after the 200 (peek reads them).
func (p *plan) sniffs() bool {
	return p.inspect && !(p.declared && p.proto != sniff.TLS && !p.l4.NeedsSNI())
}

// waitsAsIstio says whether Istio's waypoint would hold the stream for its bytes as well (an
// undeclared port: the HTTP inspector; a declared TLS port: the TLS inspector), so running out
// of wait resets it as Envoy closes it. A port declared opaque is sniffed for detour's own ends.
func (p *plan) waitsAsIstio() bool {
	return !p.declared || p.proto == sniff.TLS
}

func (p *plan) sniffDone() {
	if p.endSniff != nil {
		p.endSniff()
		p.endSniff = nil
	}
}

// plan builds req's plan. Its errors map to the CONNECT's status (hbone.Status).
func (h *Handler) plan(req *hbone.Request) (*plan, error) {
	if req.Target.Host == session.RelayHost && h.Sessions != nil {
		return &plan{req: req, relay: true}, nil
	}
	if !req.Target.IsAddr() {
		return nil, fmt.Errorf("waypoint: %w: a waypoint is addressed by IP, got %s", hbone.ErrBadAuthority, req.Target)
	}
	table := h.Routes()
	if err := h.refuseLoop(req, table); err != nil {
		return nil, err
	}
	dest, err := table.Resolve(req.Target.Addr, h.Balancer)
	if errors.Is(err, route.ErrNotBound) {
		h.Metrics.Decision(false, policyNotBound)
		return nil, fmt.Errorf("waypoint: %w: %w", hbone.ErrForbidden, err)
	}
	sessions := h.sessionsFor(dest)
	p := &plan{req: req, dest: dest, l4: h.l4For(req, dest)}
	p.steal, p.mirrors = whole(sessions)
	// A service without endpoints can still be stolen whole (the developer is its endpoint), or
	// routed to its TCPRoute's or TLSRoute's backends.
	if err != nil && (!errors.Is(err, route.ErrNoEndpoints) || (p.steal == nil && p.l4 == nil)) {
		return nil, fmt.Errorf("waypoint: %w: %w", hbone.ErrUnavailable, err)
	}
	if h.Policies != nil {
		p.engine = h.Policies()
	}
	p.proto, p.declared = protocolOf(dest.Port)
	p.inspect = h.inspects(p, sessions)
	if p.declared && p.proto == sniff.TCP && !p.l4.NeedsSNI() {
		p.inspect = false // declared opaque: attributes from the content are unknowable (fail closed)
	}
	if !p.inspect {
		if p.check, err = h.decideStream(p.engine, h.authzRequest(req, dest, "", nil), req); err != nil {
			return nil, err
		}
		if p.l4 != nil {
			p.route = h.l4Choose(p, false, "")
		}
	}
	return p, nil
}

// serveAccepted carries a stream once the 200 is sent: sniffed first when the plan inspects it
// (HTTP is then served request by request; TLS and TCP are decided with the SNI, and a denial
// resets the stream), then spliced with the onward stream, whole-stream mirrors teeing it.
// up is nil for a stream its TCPRoutes or TLSRoutes route once sniffed: it is dialed then.
func (h *Handler) serveAccepted(s *hbone.Stream, up *hbone.Stream, p *plan) error {
	var in net.Conn = s
	proto := p.proto
	if p.inspect {
		var sni string
		var err error
		if in, proto, sni, err = h.peek(s, p); err != nil {
			closeStream(up)
			return err
		}
		if proto == sniff.HTTP1 || proto == sniff.HTTP2 {
			return h.serveHTTP(s.Context(), in, up, p.req, p.dest)
		}
		if err := h.authorizeCustom(p.engine, h.authzRequest(p.req, p.dest, sni, nil), p.req, h.checkStream(s.Context(), p.req)); err != nil {
			closeStream(up)
			return err
		}
		if p.steal != nil {
			if handled, err := h.stealStream(s, in, p, p.steal, proto); handled {
				closeStream(up)
				return err
			}
		}
		if p.l4 != nil { // up is nil: where the stream goes was not known before the 200
			p.route = h.l4Choose(p, proto == sniff.TLS || sni != "", sni)
			if handled, err := h.takeRouted(s, in, p, proto); handled {
				return err // a refusal after the 200: the stream is reset
			}
			if up, err = h.connect(s.Context(), p.req, p.route.dest); err != nil {
				return err
			}
		}
	}
	return h.splice(h.mirrorStream(s.Context(), in, p.req, p.mirrorsOf()), up, p.req, p.onward(), proto)
}

func closeStream(s *hbone.Stream) {
	if s != nil {
		s.Close()
	}
}

// peek sniffs an inspected stream's first bytes, unless its port declares HTTP (nothing to
// learn): the stream to read from now on (the peeked bytes replayed), its protocol and SNI.
func (h *Handler) peek(s *hbone.Stream, p *plan) (net.Conn, sniff.Protocol, string, error) {
	if !p.sniffs() {
		return s, p.proto, "", nil
	}
	wait := h.SniffWait
	if !p.waitsAsIstio() {
		wait = cmp.Or(h.OpaqueSniffWait, DefaultOpaqueSniffWait)
	}
	sc, res, err := sniff.Sniff(s, wait)
	p.sniffDone()
	switch {
	case errors.Is(err, sniff.ErrTimeout) && p.waitsAsIstio():
		h.Metrics.SniffRefusal("timeout")
		return nil, 0, "", fmt.Errorf("waypoint: sniffing %s: %w", p.req.Target, err)
	case errors.Is(err, sniff.ErrTimeout): // declared opaque: carried as declared, unsniffed
		return sc, p.proto, "", nil
	case err != nil:
		return nil, 0, "", fmt.Errorf("waypoint: sniffing: %w", err)
	}
	if !p.declared {
		return sc, res.Protocol, res.SNI, nil
	}
	return sc, p.proto, res.SNI, nil
}

// inspects says whether p's stream is sniffed (or, on a port declared HTTP, parsed) after the
// 200 rather than decided now; a declared TCP port never is (see plan).
func (h *Handler) inspects(p *plan, sessions []*session.Session) bool {
	switch {
	case h.Inspect == InspectAlways, filtered(sessions):
		return true
	case p.engine != nil && p.engine.NeedsL7(authzService(p.dest)), h.routed(p.req, p.dest):
		return true
	case h.Authn != nil && h.Authn().Applies(authzService(p.dest)):
		return true // tokens are validated per request
	case p.l4.NeedsSNI():
		return true // a TLSRoute matches the ClientHello's SNI
	case h.Inspect == InspectOpaque, p.steal != nil, len(p.mirrors) > 0:
		return false
	}
	// As Istio's waypoint: HTTP chains on declared HTTP ports, protocol detection on the rest.
	return !p.declared || p.proto == sniff.HTTP1 || p.proto == sniff.HTTP2
}
