package testbed

import (
	"net/netip"

	"istio.io/istio/pkg/workloadapi"
)

// WaypointEndpoints are the waypoint workloads ztunnel chooses among, one per connection, for
// traffic to the service at dst: the waypoint service's pods (workloads with a service account)
// that are HEALTHY, each at IP:hbone port with its identity. ztunnel keeps only healthy
// endpoints (src/state/service.rs should_include_endpoint) and picks one at random per
// connection (src/state.rs load_balance, choose_weighted on capacity); istiod marks a pod
// UNHEALTHY once it is not Ready or has a deletionTimestamp
// (pilot/pkg/serviceregistry/ambient/workloads.go), so a deleted waypoint pod leaves this list
// with istiod's next push. A waypoint given by address is that one address. Nil when dst is no
// service the view knows or has no waypoint.
func (v *WorkloadView) WaypointEndpoints(dst netip.AddrPort) []Endpoint {
	v.mu.Lock()
	defer v.mu.Unlock()
	svc := v.serviceByVIP(dst.Addr())
	g := svc.GetWaypoint()
	if g == nil {
		return nil
	}
	port := uint16(g.GetHboneMtlsPort())
	if a := g.GetAddress(); a != nil {
		ip, ok := netip.AddrFromSlice(a.GetAddress())
		if !ok {
			return nil
		}
		e := Endpoint{Addr: netip.AddrPortFrom(ip, port).String(), HBONE: true}
		if w := v.workloadByIP(ip); w != nil {
			e.Identity = identityOf(w)
		}
		return []Endpoint{e}
	}
	h := g.GetHostname()
	var eps []Endpoint
	seen := map[netip.Addr]bool{}
	for _, a := range v.resources {
		wsvc := a.GetService()
		if wsvc == nil || wsvc.Hostname != h.GetHostname() || wsvc.Namespace != h.GetNamespace() {
			continue
		}
		for _, w := range v.workloadsOf(wsvc) {
			ip := workloadIP(w)
			if w.ServiceAccount == "" || w.Status != workloadapi.WorkloadStatus_HEALTHY || seen[ip] {
				continue
			}
			seen[ip] = true
			eps = append(eps, Endpoint{Addr: netip.AddrPortFrom(ip, port).String(), HBONE: true, Identity: identityOf(w)})
		}
	}
	return eps
}
