// Package route resolves the target of a stream arriving at the waypoint (a service VIP:port, or a
// pod IP:port for workload-addressed traffic) to where it goes: the service, its port mapping and
// a healthy endpoint. A Table is immutable and built once per config; the balancing state that
// outlives configs lives in Balancer.
package route

import (
	"cmp"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Service is a mesh service as the waypoint needs it.
type Service struct {
	Name, Namespace string
	Hostname        string       // name.namespace.svc.cluster.local
	VIPs            []netip.Addr // cluster IPs
	Ports           []Port
	Endpoints       []Endpoint
	// Unbound: known (discovered) but not bound to this waypoint: its istio.io/use-waypoint
	// resolves to another waypoint or none. Resolve refuses it: serving it would reach it with
	// the waypoint's identity, past the policies that judge its real callers. Hand-built and
	// static services are bound (false).
	Unbound bool
	// Self: this is the waypoint's own Service (the Gateway's address). Its VIPs and its
	// endpoints (the waypoint's replicas) are the waypoint itself: see Table.IsSelf.
	Self bool
}

// Port maps a service port to the endpoints' port.
type Port struct {
	Name        string
	Port        uint16
	TargetPort  uint16
	AppProtocol string // overrides protocol sniffing when set (http, http2, grpc, tls, tcp)
}

// Endpoint is one backend of a service.
type Endpoint struct {
	IP    netip.Addr
	Ready bool
	// ServiceAccount (in Namespace, default the service's) names the identity the endpoint's
	// ztunnel must present on the onward hop.
	ServiceAccount string
	Namespace      string
	// Workload is the endpoint's pod for telemetry; nil when not known.
	Workload *Workload
}

// Destination is where one stream goes.
type Destination struct {
	Service *Service // nil for a workload-addressed stream to a pod that is no service's endpoint
	Port    Port
	// Candidates are the ready endpoints, as pod IP:targetPort, in the order the balancer
	// prefers them; the dialer tries them in turn.
	Candidates []netip.AddrPort
}

// Errors the waypoint maps to a CONNECT status: 503 for the first two (nothing to send the
// stream to), 403 for ErrNotBound.
var (
	ErrUnknownTarget = errors.New("route: no service or workload at this address")
	ErrNoEndpoints   = errors.New("route: no ready endpoint")
	ErrNotBound      = errors.New("route: not bound to this waypoint")
)

// Table finds services by VIP and workloads by IP. Immutable once built.
type Table struct {
	byVIP  map[netip.Addr]*Service
	byPod  map[netip.Addr]*Service
	byName map[[2]string]*Service
	self   map[netip.Addr]bool // the Self services' VIPs and endpoints
	// workloads by pod IP: the endpoints' and the others the table was built with (sources).
	workloads map[netip.Addr]*Workload
}

// NewTable indexes services and workloads (pods that may be sources without backing a service,
// for telemetry); a VIP claimed twice is an error. A pod that is an endpoint of several services
// is workload-addressed as one that is bound, if any.
func NewTable(services []*Service, workloads ...*Workload) (*Table, error) {
	t := &Table{byVIP: map[netip.Addr]*Service{}, byPod: map[netip.Addr]*Service{}, byName: map[[2]string]*Service{},
		self: map[netip.Addr]bool{}, workloads: map[netip.Addr]*Workload{}}
	for _, w := range workloads {
		for _, ip := range w.IPs {
			t.workloads[ip.Unmap()] = w
		}
	}
	for _, s := range services {
		t.byName[[2]string{s.Namespace, s.Name}] = s
		for _, vip := range s.VIPs {
			if other, dup := t.byVIP[vip]; dup {
				return nil, fmt.Errorf("route: VIP %s belongs to both %s/%s and %s/%s", vip, other.Namespace, other.Name, s.Namespace, s.Name)
			}
			t.byVIP[vip] = s
			if s.Self {
				t.self[vip] = true
			}
		}
		for _, ep := range s.Endpoints {
			if ep.Workload != nil {
				t.workloads[ep.IP.Unmap()] = ep.Workload
			}
			if other, ok := t.byPod[ep.IP]; !ok || other.Unbound {
				t.byPod[ep.IP] = s
			}
			if s.Self {
				t.self[ep.IP] = true
			}
		}
	}
	return t, nil
}

// Services are the table's services, by namespace and name.
func (t *Table) Services() []*Service {
	out := make([]*Service, 0, len(t.byName))
	for _, s := range t.byName {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b *Service) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	return out
}

// IsSelf reports whether addr is the waypoint's own: a VIP of its Service or one of its
// replicas' pod IPs.
func (t *Table) IsSelf(addr netip.Addr) bool { return t.self[addr.Unmap()] }

// Service finds a service by namespace and name; nil if unknown.
func (t *Table) Service(namespace, name string) *Service {
	return t.byName[[2]string{namespace, name}]
}

// Resolve maps a stream's target to its destination; b orders the candidates (nil: as listed).
// With ErrNoEndpoints the destination is returned too, without candidates.
// A service that is not bound to this waypoint is ErrNotBound, addressed by VIP or by pod.
func (t *Table) Resolve(target netip.AddrPort, b *Balancer) (*Destination, error) {
	if s, ok := t.byVIP[target.Addr()]; ok {
		if s.Unbound {
			return nil, fmt.Errorf("%w: %s/%s (its istio.io/use-waypoint names another waypoint or none)", ErrNotBound, s.Namespace, s.Name)
		}
		return t.servicePort(s, target.Port(), b)
	}
	if s, ok := t.byPod[target.Addr()]; ok {
		if s.Unbound {
			return nil, fmt.Errorf("%w: workload %s of %s/%s (its istio.io/use-waypoint names another waypoint or none)", ErrNotBound, target.Addr(), s.Namespace, s.Name)
		}
		// Workload-addressed: the pod itself, on the port asked for.
		port := Port{Port: target.Port(), TargetPort: target.Port()}
		for _, p := range s.Ports {
			if p.TargetPort == target.Port() {
				port = p
			}
		}
		return &Destination{Service: s, Port: port, Candidates: []netip.AddrPort{target}}, nil
	}
	return nil, fmt.Errorf("%w: %s", ErrUnknownTarget, target)
}

// ResolveService is the destination of service namespace/name on port (a route's backend),
// with the errors of Resolve. Unlike a stream's own target, a backend need not be bound to this
// waypoint: the route that names it is (istiod's waypoint sends to a backend's endpoints).
func (t *Table) ResolveService(namespace, name string, port uint16, b *Balancer) (*Destination, error) {
	s := t.Service(namespace, name)
	if s == nil {
		return nil, fmt.Errorf("%w: service %s/%s", ErrUnknownTarget, namespace, name)
	}
	return t.servicePort(s, port, b)
}

func (t *Table) servicePort(s *Service, port uint16, b *Balancer) (*Destination, error) {
	i := slices.IndexFunc(s.Ports, func(p Port) bool { return p.Port == port })
	if i < 0 {
		return nil, fmt.Errorf("%w: %s/%s has no port %d", ErrUnknownTarget, s.Namespace, s.Name, port)
	}
	p := s.Ports[i]
	var ready []netip.AddrPort
	for _, ep := range s.Endpoints {
		if ep.Ready {
			ready = append(ready, netip.AddrPortFrom(ep.IP, p.TargetPort))
		}
	}
	if len(ready) == 0 {
		// The destination still says which service it is (a debug session may take it).
		return &Destination{Service: s, Port: p}, fmt.Errorf("%w for %s/%s", ErrNoEndpoints, s.Namespace, s.Name)
	}
	return &Destination{Service: s, Port: p, Candidates: b.order(s.Hostname, ready)}, nil
}

// DefaultEjection is how long an endpoint that failed to connect is skipped.
const DefaultEjection = 10 * time.Second

// Balancing policies.
const (
	RoundRobin   = "round-robin"   // the default
	LeastRequest = "least-request" // Envoy's: the less busy of two endpoints picked at random
)

// Balancer spreads streams (and HTTP requests) over a service's endpoints, round robin or least
// request, and skips, for Ejection, an endpoint that failed to connect (outlier ejection). Safe for
// concurrent use; the zero value is round robin with DefaultEjection.
type Balancer struct {
	Policy   string           // RoundRobin ("" too) or LeastRequest
	Ejection time.Duration    // 0 means DefaultEjection
	Now      func() time.Time // nil means time.Now
	Rand     func(n int) int  // nil means math/rand/v2.IntN; LeastRequest's choice

	mu      sync.Mutex
	next    map[string]int
	ejected map[netip.AddrPort]time.Time // until when
	active  map[netip.AddrPort]int       // streams and requests in flight, for LeastRequest
}

// order rotates ready by the service's round-robin counter and moves ejected endpoints last (they
// are still tried if everything else fails).
func (b *Balancer) order(key string, ready []netip.AddrPort) []netip.AddrPort {
	if b == nil {
		return ready
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.next == nil {
		b.next = map[string]int{}
	}
	start := 0 // least request: drawn at random below
	if b.Policy != LeastRequest {
		start = b.next[key] % len(ready)
		b.next[key]++
	}
	out := make([]netip.AddrPort, 0, len(ready))
	var ejected []netip.AddrPort
	now := b.now()
	for i := range ready {
		ep := ready[(start+i)%len(ready)]
		if until, ok := b.ejected[ep]; ok && now.Before(until) {
			ejected = append(ejected, ep)
			continue
		}
		out = append(out, ep)
	}
	if b.Policy == LeastRequest && len(out) > 1 {
		i := b.leastOfTwo(out)
		out[0], out[i] = out[i], out[0]
	}
	return append(out, ejected...)
}

// leastOfTwo picks two distinct endpoints at random and returns the index of the less busy one.
func (b *Balancer) leastOfTwo(ready []netip.AddrPort) int {
	intn := b.Rand
	if intn == nil {
		intn = rand.IntN
	}
	i := intn(len(ready))
	j := (i + 1 + intn(len(ready)-1)) % len(ready)
	if b.active[ready[j]] < b.active[ready[i]] {
		return j
	}
	return i
}

// Started counts a stream or request in flight on ep; call Done when it ends.
func (b *Balancer) Started(ep netip.AddrPort) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.active == nil {
		b.active = map[netip.AddrPort]int{}
	}
	b.active[ep]++
}

// InFlight is what Started counted on ep and Done has not ended yet.
func (b *Balancer) InFlight(ep netip.AddrPort) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.active[ep]
}

// Done ends what Started counted.
func (b *Balancer) Done(ep netip.AddrPort) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.active[ep] <= 1 {
		delete(b.active, ep)
		return
	}
	b.active[ep]--
}

// Failed ejects ep after a failed connect.
func (b *Balancer) Failed(ep netip.AddrPort) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ejected == nil {
		b.ejected = map[netip.AddrPort]time.Time{}
	}
	d := b.Ejection
	if d <= 0 {
		d = DefaultEjection
	}
	b.ejected[ep] = b.now().Add(d)
}

// Succeeded returns ep to rotation.
func (b *Balancer) Succeeded(ep netip.AddrPort) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.ejected, ep)
}

func (b *Balancer) now() time.Time {
	if b.Now != nil {
		return b.Now()
	}
	return time.Now()
}
