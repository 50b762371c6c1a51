package testbed

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"
	"istio.io/istio/pkg/workloadapi"
)

// AddressType is the workload xDS type ztunnel subscribes to (ztunnel src/xds.rs ADDRESS_TYPE).
const AddressType = "type.googleapis.com/istio.workload.Address"

// WorkloadView is what ztunnel knows: istiod's workload xDS (delta ADS, type
// istio.workload.Address, wildcard), kept current. It follows ztunnel's xDS client
// (src/xds/client.rs): a delta stream with a ztunnel node id
// (ztunnel~IP~POD.NS~NS.svc.cluster.local) and CLUSTER_ID metadata, every response ACKed with its
// nonce, removals honoured. The test bed's istiod serves plaintext xDS on loopback, so this view
// dials it without a token (ztunnel uses 15012 with its projected token).
type WorkloadView struct {
	mu        sync.Mutex
	resources map[string]*workloadapi.Address // by resource name
	changed   chan struct{}                   // closed and replaced on every update
	done      chan struct{}
	err       error
}

// WatchWorkloads subscribes to istiod's workload xDS until ctx ends.
func (c *Cluster) WatchWorkloads(ctx context.Context) (*WorkloadView, error) {
	conn, err := grpc.NewClient(c.Istiod.XDSAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("testbed: dialing istiod xDS: %w", err)
	}
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("testbed: opening the delta ADS stream: %w", err)
	}
	meta, _ := structpb.NewStruct(map[string]any{"CLUSTER_ID": "Kubernetes", "NAMESPACE": "istio-system", "ISTIO_VERSION": "1.31.0"})
	node := &core.Node{Id: "ztunnel~10.244.0.1~ztunnel-testbed.istio-system~istio-system.svc.cluster.local", Metadata: meta}
	if err := stream.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: AddressType}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("testbed: subscribing to %s: %w", AddressType, err)
	}
	v := &WorkloadView{resources: map[string]*workloadapi.Address{}, changed: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(v.done)
		defer conn.Close()
		for {
			resp, err := stream.Recv()
			if err != nil {
				v.mu.Lock()
				v.err = err
				v.mu.Unlock()
				return
			}
			v.apply(resp)
			if err := stream.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resp.TypeUrl, ResponseNonce: resp.Nonce}); err != nil {
				return
			}
		}
	}()
	return v, nil
}

func (v *WorkloadView) apply(resp *discovery.DeltaDiscoveryResponse) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, name := range resp.RemovedResources {
		delete(v.resources, name)
	}
	for _, r := range resp.Resources {
		a := &workloadapi.Address{}
		if r.Resource == nil || r.Resource.UnmarshalTo(a) != nil {
			continue
		}
		v.resources[r.Name] = a
	}
	close(v.changed)
	v.changed = make(chan struct{})
}

// Target is where ztunnel sends a connection to a destination address.
type Target struct {
	// Waypoint is the waypoint's workload address (IP:hbone port) when the destination has a
	// waypoint, else "".
	Waypoint string
	// WaypointIdentity is the SPIFFE ID ztunnel checks on the waypoint's certificate: the waypoint
	// workload's service account.
	WaypointIdentity string
	// Authority is the CONNECT authority: VIP:port for a service (through its waypoint or to a
	// workload), the workload's IP:targetPort when direct.
	Authority string
	// Workloads are the destination's workload addresses (IP:targetPort), the candidates when
	// there is no waypoint.
	Workloads []string
	// Endpoints are Workloads with what ztunnel needs to reach each: its tunnel protocol and
	// identity.
	Endpoints []Endpoint
	// Service is the hostname of the service dst addresses, "" for a pod address: ztunnel's
	// intended_destination_service, sent as Forwarded's host.
	Service string
}

// Endpoint is one destination workload.
type Endpoint struct {
	Addr string // IP:targetPort
	// HBONE is true when the workload's tunnel protocol is HBONE (istiod sets it for a pod that
	// Istio CNI enrolled): ztunnel then sends HBONE to IP:15008 with authority Addr, else plain
	// TCP to Addr (src/proxy/outbound.rs, InboundProtocol).
	HBONE    bool
	Identity string // the SPIFFE ID to check on an HBONE peer
}

// Route answers as ztunnel's outbound (src/proxy/outbound.rs build_request): a service VIP with a
// waypoint goes to one of the waypoint service's workloads on its HBONE port with the authority
// VIP:port; without a waypoint, to the service's workloads. A pod address follows the workload's
// own waypoint the same way. ok is false when the view knows no such destination.
func (v *WorkloadView) Route(dst netip.AddrPort) (t Target, ok bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if svc := v.serviceByVIP(dst.Addr()); svc != nil {
		t.Authority, t.Service = dst.String(), svc.Hostname
		for _, w := range v.workloadsOf(svc) {
			if tp := targetPort(w, svc, dst.Port()); tp != 0 {
				addr := netip.AddrPortFrom(workloadIP(w), tp).String()
				t.Workloads = append(t.Workloads, addr)
				t.Endpoints = append(t.Endpoints, endpointOf(w, addr))
			}
		}
		v.waypoint(svc.GetWaypoint(), &t)
		return t, true
	}
	if w := v.workloadByIP(dst.Addr()); w != nil {
		t.Authority = dst.String()
		t.Workloads = []string{dst.String()}
		t.Endpoints = []Endpoint{endpointOf(w, dst.String())}
		v.waypoint(w.GetWaypoint(), &t)
		return t, true
	}
	return Target{}, false
}

// waypoint resolves a GatewayAddress as ztunnel does: by hostname, the waypoint service's first
// workload (ztunnel picks one of them; the test bed has one); by address, that address.
func (v *WorkloadView) waypoint(g *workloadapi.GatewayAddress, t *Target) {
	if g == nil {
		return
	}
	port := uint16(g.GetHboneMtlsPort())
	if a := g.GetAddress(); a != nil {
		if ip, ok := netip.AddrFromSlice(a.GetAddress()); ok {
			t.Waypoint = netip.AddrPortFrom(ip, port).String()
			if w := v.workloadByIP(ip); w != nil {
				t.WaypointIdentity = identityOf(w)
			}
		}
		return
	}
	h := g.GetHostname()
	for _, a := range v.resources {
		svc := a.GetService()
		if svc == nil || svc.Hostname != h.GetHostname() || svc.Namespace != h.GetNamespace() {
			continue
		}
		// istiod may hold a workload for the same address from the EndpointSlice too (no
		// service account): the pod's, which has one, is the waypoint's identity.
		for _, w := range v.workloadsOf(svc) {
			if t.Waypoint == "" || w.ServiceAccount != "" {
				t.Waypoint = netip.AddrPortFrom(workloadIP(w), port).String()
				t.WaypointIdentity = identityOf(w)
			}
			if w.ServiceAccount != "" {
				return
			}
		}
		return
	}
}

func (v *WorkloadView) serviceByVIP(ip netip.Addr) *workloadapi.Service {
	for _, a := range v.resources {
		if svc := a.GetService(); svc != nil {
			for _, na := range svc.Addresses {
				if got, ok := netip.AddrFromSlice(na.GetAddress()); ok && got == ip {
					return svc
				}
			}
		}
	}
	return nil
}

func (v *WorkloadView) workloadByIP(ip netip.Addr) *workloadapi.Workload {
	for _, a := range v.resources {
		if w := a.GetWorkload(); w != nil && workloadIP(w) == ip {
			return w
		}
	}
	return nil
}

// workloadsOf are the workloads whose services map names svc (key NS/hostname, ztunnel's
// NamespacedHostname).
func (v *WorkloadView) workloadsOf(svc *workloadapi.Service) []*workloadapi.Workload {
	key := svc.Namespace + "/" + svc.Hostname
	var ws []*workloadapi.Workload
	for _, a := range v.resources {
		if w := a.GetWorkload(); w != nil && len(w.Addresses) > 0 {
			if _, ok := w.Services[key]; ok {
				ws = append(ws, w)
			}
		}
	}
	return ws
}

func workloadIP(w *workloadapi.Workload) netip.Addr {
	if len(w.Addresses) == 0 {
		return netip.Addr{}
	}
	ip, _ := netip.AddrFromSlice(w.Addresses[0])
	return ip
}

// targetPort is the workload's port for the service port: the workload's own mapping first,
// then the service's (ztunnel src/state.rs).
func targetPort(w *workloadapi.Workload, svc *workloadapi.Service, port uint16) uint16 {
	if pl := w.Services[svc.Namespace+"/"+svc.Hostname]; pl != nil {
		for _, p := range pl.Ports {
			if p.ServicePort == uint32(port) && p.TargetPort != 0 {
				return uint16(p.TargetPort)
			}
		}
	}
	for _, p := range svc.Ports {
		if p.ServicePort == uint32(port) {
			if p.TargetPort != 0 {
				return uint16(p.TargetPort)
			}
			return port
		}
	}
	return 0
}

func endpointOf(w *workloadapi.Workload, addr string) Endpoint {
	return Endpoint{Addr: addr, HBONE: w.TunnelProtocol == workloadapi.TunnelProtocol_HBONE, Identity: identityOf(w)}
}

// Baggage is the baggage header ztunnel sends for the workload at ip (src/baggage.rs
// baggage_header_val over src/state/workload.rs Workload::baggage), "" when the view does not
// know it.
func (v *WorkloadView) Baggage(ip netip.Addr) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	w := v.workloadByIP(ip)
	if w == nil {
		return ""
	}
	kind := strings.ToLower(w.WorkloadType.String())
	var parts []string
	for _, kv := range [][2]string{
		{"k8s.cluster.name", w.ClusterId}, {"k8s.namespace.name", w.Namespace}, {"k8s." + kind + ".name", w.WorkloadName},
		{"service.name", w.CanonicalName}, {"service.version", w.CanonicalRevision},
		{"cloud.region", w.GetLocality().GetRegion()}, {"cloud.availability_zone", w.GetLocality().GetZone()},
	} {
		if kv[1] != "" {
			parts = append(parts, kv[0]+"="+kv[1])
		}
	}
	return strings.Join(parts, ",")
}

func identityOf(w *workloadapi.Workload) string {
	td := w.TrustDomain
	if td == "" {
		td = TrustDomain
	}
	return "spiffe://" + td + "/ns/" + w.Namespace + "/sa/" + w.ServiceAccount
}

// WaitRoute polls the view until ok accepts the route to dst, or timeout passes; it returns the
// last route seen.
func (v *WorkloadView) WaitRoute(ctx context.Context, dst netip.AddrPort, timeout time.Duration, ok func(Target, bool) bool) (Target, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		v.mu.Lock()
		changed, err := v.changed, v.err
		v.mu.Unlock()
		t, found := v.Route(dst)
		if ok(t, found) {
			return t, nil
		}
		if err != nil {
			return t, fmt.Errorf("testbed: workload xDS stream ended: %w", err)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return t, fmt.Errorf("testbed: the route to %s never became as expected (last %+v, known %v)", dst, t, found)
		}
	}
}

// Len is the number of addresses in the view.
func (v *WorkloadView) Len() int { v.mu.Lock(); defer v.mu.Unlock(); return len(v.resources) }

// Describe is the view's addresses in ztunnel's JSON form, for a failing test's message.
func (v *WorkloadView) Describe() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	var b strings.Builder
	for name, a := range v.resources {
		j, _ := protojson.Marshal(a)
		fmt.Fprintf(&b, "%s: %s\n", name, j)
	}
	return b.String()
}
