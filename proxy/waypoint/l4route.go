package waypoint

import (
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/sniff"
)

// TCPRoutes and TLSRoutes at the waypoint (proxy/README.md, "Routes (TCPRoute and TLSRoute)").
// They apply to the streams the waypoint carries as bytes, addressed to a service VIP (a pod IP
// is never routed, as for HTTP routes); a port declared HTTP, HTTP2 or gRPC takes none of them
// (its streams are HTTP, as Istio's waypoint builds an HTTP filter chain there and no TCP one).
//
// Refusals, and how they differ from Istio. istiod turns a TCPRoute or TLSRoute rule into a
// VirtualService tcp/tls route (pilot/pkg/config/kube/gateway/conversion.go, convertTCPRoute and
// convertTLSRoute: a rule whose weights sum to 0 gets one destination, the host
// internal.cluster.local subset zero-weight, which has no cluster, "the spec requires us to
// reject connections"; buildTCPDestination keeps an invalid backendRef as a destination that has
// no cluster either), and the waypoint's TCP filter chain into one Envoy tcp_proxy per service
// port with those backends as weighted clusters (pilot/pkg/networking/core/listener_waypoint.go,
// buildWaypointNetworkFilters and getWaypointTCPRoutes). So Envoy accepts the HBONE CONNECT on
// its connect_terminate listener (buildWaypointInboundConnectTerminate: the CONNECT goes to the
// main_internal listener, there at once), then its tcp_proxy finds no cluster or no healthy host for
// the connection drawn to such a backend and closes it: the client sees its stream open and
// then end. detour refuses instead, respecting weights as the spec asks: where the route can be
// decided at CONNECT (a TCPRoute on a stream it does not sniff) the CONNECT is answered 503
// before anything is dialed; where it needs the ClientHello (a TLSRoute) or the sniffed protocol
// (an undeclared port), which arrive after the 200, the stream is reset. Istio's waypoint also
// never matches the SNI (getTLSRouteMatch: "Waypoint does not currently support SNI matches"; a
// TLSRoute applies to the whole port only when its hostnames are the service's own hostname);
// detour matches the ClientHello's SNI against the hostnames as the Gateway API defines them.

// l4For is the TCPRoutes and TLSRoutes that apply to req's stream to dest: addressed by a VIP
// of its service, on a port not declared HTTP. nil: none (forward as before).
func (h *Handler) l4For(req *hbone.Request, dest *route.Destination) *l4route.Routes {
	if h.L4Routes == nil || dest == nil || dest.Service == nil || !slices.Contains(dest.Service.VIPs, req.Target.Addr.Addr().Unmap()) {
		return nil
	}
	if proto, declared := protocolOf(dest.Port); declared && (proto == sniff.HTTP1 || proto == sniff.HTTP2) {
		return nil
	}
	return h.L4Routes().For(dest.Service.Namespace, dest.Service.Name, dest.Port.Port)
}

// l4Choice is where a routed stream goes: the backend its routes drew, with that backend's
// whole-stream sessions (proxy/README.md, "Routes (TCPRoute and TLSRoute)": a session on a
// backend sees the streams drawn for it), or the refusal, err with Envoy's response flag.
type l4Choice struct {
	dest    *route.Destination // the drawn backend; set, without candidates, when it has no ready endpoint
	steal   *session.Session   // the backend's whole-stream steal
	mirrors []*session.Session // the backend's whole-stream mirrors
	flags   string             // the refusal's: NR (no route), NC (no valid or weighted backend), UH (no ready endpoint)
	err     error              // the refusal (hbone.ErrUnavailable); its steal may still take the stream (UH)
}

// l4Choose draws where p's stream goes by its routes, tls and sni being what its first bytes
// say: the drawn backend's destination (that Service's ready endpoints, whose identities the
// onward dial checks) and its sessions. A refusal (see above): no route takes the stream, the
// rule has no weighted backend, the drawn backendRef is invalid, or the drawn backend has no
// ready endpoint (then its whole-stream steal, the developer being its endpoint, may still take
// the stream).
func (h *Handler) l4Choose(p *plan, tls bool, sni string) l4Choice {
	svc := p.dest.Service
	rule := p.l4.Match(tls, sni)
	if rule == nil {
		return l4Choice{flags: "NR", err: fmt.Errorf("waypoint: %w: no TLSRoute or TCPRoute of %s/%s port %d takes the stream (SNI %q)",
			hbone.ErrUnavailable, svc.Namespace, svc.Name, p.dest.Port.Port, sni)}
	}
	b := rule.Pick(h.intn)
	switch {
	case b == nil:
		return l4Choice{flags: "NC", err: fmt.Errorf("waypoint: %w: %s: no backend has a weight", hbone.ErrUnavailable, rule.Route)}
	case b.Invalid != "":
		return l4Choice{flags: "NC", err: fmt.Errorf("waypoint: %w: %s: %s", hbone.ErrUnavailable, rule.Route, b.Invalid)}
	}
	dest, err := h.Routes().ResolveService(b.Namespace, b.Name, b.Port, h.Balancer)
	c := l4Choice{dest: dest}
	c.steal, c.mirrors = whole(h.sessionsFor(dest))
	if err != nil {
		c.flags, c.err = "UH", fmt.Errorf("waypoint: %w: %s: %w", hbone.ErrUnavailable, rule.Route, err)
		if !errors.Is(err, route.ErrNoEndpoints) {
			c.flags = "NC" // the backend left the table since the routes were compiled
		}
	}
	return c
}

// takeRouted carries out p's route once the addressed service's sessions passed the stream on:
// the drawn backend's whole-stream steal takes it, else a refusal is recorded and returned.
// handled: the stream is done with (err its result); false: dial p.route.dest.
func (h *Handler) takeRouted(s *hbone.Stream, in net.Conn, p *plan, proto sniff.Protocol) (handled bool, err error) {
	if st := p.route.steal; st != nil {
		if handled, err := h.stealStream(s, in, p, st, proto); handled {
			return true, err
		}
	}
	if p.route.err != nil {
		return true, h.refused(p.req, p.dest, proto, p.route.flags, p.route.err)
	}
	return false, nil
}

// mirrorsOf are the whole-stream mirrors p's stream is copied to: the addressed service's,
// then its route's backend's.
func (p *plan) mirrorsOf() []*session.Session {
	if len(p.route.mirrors) == 0 {
		return p.mirrors
	}
	return slices.Concat(p.mirrors, p.route.mirrors)
}

// onward is where p's bytes go: its route's backend, else the addressed service.
func (p *plan) onward() *route.Destination {
	if p.route.dest != nil {
		return p.route.dest
	}
	return p.dest
}
