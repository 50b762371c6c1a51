package waypoint

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/route"
)

// HopHeader marks every CONNECT the waypoint sends on. A CONNECT that arrives carrying it was
// forwarded by a detour waypoint already (itself, or a replica, through a service whose
// endpoints are the waypoint's pods): serving it would forward it again, a loop. Relays between
// replicas do not carry it (they go to RelayTarget, served before any route).
const HopHeader = "Detour-Hop"

// Own is the set of the waypoint's own addresses known without discovery: its listeners and
// its pod IPs. Discovery adds the rest per snapshot (route.Service.Self: the Gateway's Service
// VIPs and replicas). Immutable; the zero value (or nil) holds nothing.
type Own struct {
	ips   map[netip.Addr]bool     // the waypoint on every port (its pod IPs)
	addrs map[netip.AddrPort]bool // listeners on one address
	ports map[uint16]bool         // listeners on every local address (0.0.0.0:port)
	local map[netip.Addr]bool     // this host's interface addresses, for ports
}

// OwnAddresses builds the set from the listeners' bound addresses and the pod's IPs (POD_IP,
// read by the caller). A listener on an unspecified address covers every interface address of
// this host, read here once.
func OwnAddresses(listeners []net.Addr, podIPs ...string) (*Own, error) {
	o := &Own{ips: map[netip.Addr]bool{}, addrs: map[netip.AddrPort]bool{}, ports: map[uint16]bool{}, local: map[netip.Addr]bool{}}
	for _, s := range podIPs {
		if s == "" {
			continue
		}
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("waypoint: pod IP %q: %w", s, err)
		}
		o.ips[ip.Unmap()] = true
	}
	for _, l := range listeners {
		ap, err := netip.ParseAddrPort(l.String())
		if err != nil {
			return nil, fmt.Errorf("waypoint: listener address %q: %w", l, err)
		}
		if ap.Addr().IsUnspecified() {
			o.ports[ap.Port()] = true
			continue
		}
		o.addrs[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())] = true
	}
	if len(o.ports) > 0 {
		ifs, err := net.InterfaceAddrs()
		if err != nil {
			return nil, fmt.Errorf("waypoint: reading this host's addresses: %w", err)
		}
		for _, a := range ifs {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				o.local[p.Addr().Unmap()] = true
			}
		}
	}
	return o, nil
}

// Has reports whether ap reaches this waypoint.
func (o *Own) Has(ap netip.AddrPort) bool {
	if o == nil {
		return false
	}
	ip := ap.Addr().Unmap()
	return o.ips[ip] || o.addrs[netip.AddrPortFrom(ip, ap.Port())] || o.ports[ap.Port()] && o.local[ip]
}

// refuseLoop refuses, before anything is resolved or dialed, a CONNECT another detour waypoint
// already forwarded, or one addressed to the waypoint itself.
func (h *Handler) refuseLoop(req *hbone.Request, table *route.Table) error {
	if req.Header.Get(HopHeader) != "" {
		h.Metrics.Decision(false, policyLoop)
		return fmt.Errorf("waypoint: %w: %s was already forwarded by a detour waypoint (%s: %s): a forwarding loop",
			hbone.ErrBadAuthority, req.Target, HopHeader, req.Header.Get(HopHeader))
	}
	if table.IsSelf(req.Target.Addr.Addr()) || h.Own.Has(req.Target.Addr) {
		h.Metrics.Decision(false, policyLoop)
		return fmt.Errorf("waypoint: %w: %s is this waypoint's own address: a forwarding loop", hbone.ErrBadAuthority, req.Target)
	}
	return nil
}

// selfEndpoint refuses an onward dial to the waypoint itself (a service whose endpoints are
// the waypoint's pods, or a static endpoint at one of its listeners).
func (h *Handler) selfEndpoint(dest *route.Destination, ep, dial netip.AddrPort) error {
	if !h.Routes().IsSelf(ep.Addr()) && !h.Own.Has(dial) && !h.Own.Has(ep) {
		return nil
	}
	h.Metrics.Decision(false, policyLoop)
	name := ""
	if dest.Service != nil {
		name = " of " + dest.Service.Namespace + "/" + dest.Service.Name
	}
	return fmt.Errorf("waypoint: %w: endpoint %s%s is this waypoint itself: a forwarding loop", hbone.ErrUnavailable, ep, name)
}

// The policy names the waypoint's own refusals are counted under (detour_authz_decisions_total).
const (
	policyLoop     = "detour/forwarding-loop"
	policyNotBound = "detour/not-bound"
)
