// Package l4route is the waypoint's TCP and TLS route table: the Gateway API TCPRoutes and
// TLSRoutes attached to Services (parentRefs of kind Service, with or without a port, as istiod
// reads them for a waypoint in pilot/pkg/config/kube/gateway/route_collections.go), compiled
// once per snapshot into the routes of each service port. A stream the waypoint carries as bytes
// (not served as HTTP) to a port with routes goes to the first TLSRoute whose hostnames match its
// SNI, else to the port's TCPRoute, each connection to one of the rule's backends drawn by
// weight; a port with no route is forwarded as before (Table.For says which).
package l4route

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	"github.com/detour-mesh/detour/proxy/httproute"
)

// Table holds the compiled TCPRoutes and TLSRoutes of one snapshot. Immutable; safe for
// concurrent use. A nil *Table has no routes.
type Table struct {
	ports      map[portKey]*portRoutes
	outOfScope []httproute.OutOfScope
}

type portKey struct {
	ns, name string
	port     uint16
}

type portRoutes struct {
	tls, tcp set
	// Built once compiled, so For allocates nothing: the routes every caller sees.
	all *Routes
}

// set is the routes of one kind on one service port as Istio's waypoint selects them
// (pilot/pkg/networking/core/listener_waypoint.go: getVirtualServiceForWaypoint keeps routes in
// the service's namespace or the waypoint's, for every caller; getWaypointTCPRoutes takes the
// first match in the order VirtualServicesForGateway lists them, the waypoint's namespace
// first). Routes in any other namespace are not applied (Table.OutOfScope names them).
type set struct {
	waypointNS, serviceNS []*entry
}

// joined is the set in match order: the waypoint's namespace's routes, then the Service's.
func (s *set) joined() []*entry { return slices.Concat(s.waypointNS, s.serviceNS) }

// entry is one route on one port: for a TLSRoute, one of its hostnames.
type entry struct {
	host     string // TLS: the exact SNI, or a wildcard's suffix (".example.com"); "": any SNI
	wildcard bool
	rule     *Rule
	order    int // the route's place by age, then namespace/name
}

func (e *entry) matches(sni string) bool {
	switch {
	case e.host == "":
		return true
	case e.wildcard:
		return len(sni) > len(e.host) && strings.HasSuffix(sni, e.host)
	}
	return sni == e.host
}

// cmpTLS orders a port's TLS entries in the spec's hostname precedence: exact hostnames, then
// wildcards by the most characters, then routes without hostnames; ties go to the older route.
func cmpTLS(a, b *entry) int {
	rank := func(e *entry) int {
		switch {
		case e.host == "":
			return 2
		case e.wildcard:
			return 1
		}
		return 0
	}
	return cmp.Or(cmp.Compare(rank(a), rank(b)), cmp.Compare(len(b.host), len(a.host)), cmp.Compare(a.order, b.order))
}

// Routes are the TCPRoutes and TLSRoutes of one service port as one caller sees them.
// Immutable.
type Routes struct {
	tls, tcp []*entry
}

// OutOfScope lists the routes left out because of their namespace (see Compile), in Compile's
// order.
func (t *Table) OutOfScope() []httproute.OutOfScope {
	if t == nil {
		return nil
	}
	return t.outOfScope
}

// For returns the routes attached to service namespace/name's port, the same for every caller;
// nil when none applies (forward as without routes).
func (t *Table) For(namespace, name string, port uint16) *Routes {
	if t == nil {
		return nil
	}
	p := t.ports[portKey{namespace, name, port}]
	if p == nil {
		return nil
	}
	r := p.all
	if len(r.tls) == 0 && len(r.tcp) == 0 {
		return nil
	}
	return r
}

// NeedsSNI reports whether a TLSRoute is attached: the stream's ClientHello decides.
func (r *Routes) NeedsSNI() bool { return r != nil && len(r.tls) > 0 }

// Match is the rule for a stream: when it is TLS, the first TLSRoute whose hostnames match
// sni (those in the waypoint's namespace first, then the Service's; within one namespace exact
// before wildcard, the longest wildcard first); else, or when none matches, the port's first
// TCPRoute (GEP-1294: TLSRoutes before TCPRoutes, as listener_waypoint.go getWaypointTCPRoutes
// tries every selected route's TLS before any TCP): the waypoint's namespace's before the
// Service's, the oldest when several attach (the spec's conflict rule; v1 has one rule per
// route). nil: no route takes the stream, which is
// refused.
func (r *Routes) Match(tls bool, sni string) *Rule {
	if r == nil {
		return nil
	}
	if tls {
		sni = strings.ToLower(strings.TrimSuffix(sni, "."))
		for _, e := range r.tls {
			if e.matches(sni) {
				return e.rule
			}
		}
	}
	if len(r.tcp) > 0 {
		return r.tcp[0].rule
	}
	return nil
}

// Rule is a route's rule: its weighted backends. Immutable once compiled.
type Rule struct {
	Route    string // kind namespace/name, for logs
	Backends []Backend

	totalWeight int
}

// Backend is one weighted backendRef.
type Backend struct {
	Namespace, Name string
	Port            uint16
	Weight          int
	// Invalid says why the backendRef cannot be used (not a Service, unknown, no such port):
	// the connections it is drawn for are refused, as the spec asks (weights respected).
	Invalid string
}

// Pick draws a backend by weight with intn (math/rand/v2.IntN, injectable for tests), once per
// connection; nil when no backend has a weight (the spec: every connection is refused).
func (r *Rule) Pick(intn func(int) int) *Backend {
	if r.totalWeight <= 0 {
		return nil
	}
	n := intn(r.totalWeight)
	for i := range r.Backends {
		b := &r.Backends[i]
		if n < b.Weight {
			return b
		}
		n -= b.Weight
	}
	return nil
}

// Compile builds the table of TCPRoutes and TLSRoutes attached to services, once per snapshot,
// for the waypoint in namespace waypointNS, with proxy/httproute's rule (httproute.Scope): a
// route applies, to every caller, to a parent Service in its own namespace or, when the route is
// in waypointNS, to one in any namespace; a route in a third namespace is not applied and is
// listed by Table.OutOfScope.
// A route that cannot be compiled (more than one rule, a bad hostname or weight) is left out
// whole, as Istio leaves it unaccepted, and named in the returned error; the others still apply.
// A backendRef that names no known Service is kept and refuses the connections drawn for it.
// Cross-namespace backendRefs need no ReferenceGrant (Istio does not enforce them for mesh
// parents: route_collections.go converts with enforceRefGrant = !mesh).
func Compile(svcs httproute.Services, waypointNS string, tcps []*TCPRoute, tlss []*TLSRoute) (*Table, error) {
	type routeRef struct {
		meta httproute.Metadata
		tcp  *TCPRoute
		tls  *TLSRoute
	}
	var all []routeRef
	for _, r := range tcps {
		all = append(all, routeRef{meta: r.Metadata, tcp: r})
	}
	for _, r := range tlss {
		all = append(all, routeRef{meta: r.Metadata, tls: r})
	}
	// The oldest route first, then by namespace/name: the spec's tie-breaks.
	slices.SortStableFunc(all, func(a, b routeRef) int {
		if c := a.meta.CreationTimestamp.Compare(b.meta.CreationTimestamp); c != 0 {
			return c
		}
		return cmp.Or(strings.Compare(a.meta.Namespace, b.meta.Namespace), strings.Compare(a.meta.Name, b.meta.Name))
	})
	t := &Table{ports: map[portKey]*portRoutes{}}
	var errs []error
	for order, r := range all {
		var err error
		if r.tcp != nil {
			err = t.add(svcs, waypointNS, order, "TCPRoute", r.meta, r.tcp.Spec.ParentRefs, nil, r.tcp.Spec.Rules)
		} else {
			err = t.add(svcs, waypointNS, order, "TLSRoute", r.meta, r.tls.Spec.ParentRefs, r.tls.Spec.Hostnames, r.tls.Spec.Rules)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range t.ports {
		slices.SortStableFunc(p.tls.waypointNS, cmpTLS)
		slices.SortStableFunc(p.tls.serviceNS, cmpTLS)
		p.all = &Routes{tls: p.tls.joined(), tcp: p.tcp.joined()}
		p.tls, p.tcp = set{}, set{}
	}
	return t, errors.Join(errs...)
}

// add compiles one route (hosts is nil for a TCPRoute) and attaches it to its parents.
func (t *Table) add(svcs httproute.Services, waypointNS string, order int, kind string, meta httproute.Metadata, parents []httproute.ParentRef, hosts []string, rules []RouteRule) error {
	if meta.Name == "" || meta.Namespace == "" {
		return fmt.Errorf("l4route: a %s needs metadata.name and metadata.namespace", kind)
	}
	name := kind + " " + meta.Namespace + "/" + meta.Name
	refused := func(err error) error {
		return fmt.Errorf("l4route: %w", &httproute.RouteError{Kind: kind, Namespace: meta.Namespace, Name: meta.Name, Err: err})
	}
	if len(rules) != 1 {
		return refused(fmt.Errorf("has %d rules; a %s has exactly one (gateway.networking.k8s.io/v1), merge them into one rule's backendRefs", len(rules), kind))
	}
	rule, err := compileRule(svcs, meta.Namespace, rules[0])
	if err != nil {
		return refused(fmt.Errorf("rules[0]: %w", err))
	}
	rule.Route = name
	var es []*entry
	if kind == "TCPRoute" {
		es = []*entry{{rule: rule, order: order}}
	} else if es, err = tlsEntries(hosts, rule, order); err != nil {
		return refused(err)
	}
	t.attach(svcs, waypointNS, kind, meta, parents, es)
	return nil
}

func compileRule(svcs httproute.Services, ns string, r RouteRule) (*Rule, error) {
	rule := &Rule{}
	for i, ref := range r.BackendRefs {
		b := Backend{Name: ref.Name, Weight: 1}
		b.Namespace, b.Port, b.Invalid = httproute.BackendService(svcs, ns, ref.BackendObjectRef)
		if ref.Weight != nil {
			if *ref.Weight < 0 || *ref.Weight > 1000000 {
				return nil, fmt.Errorf("backendRefs[%d]: weight %d is outside 0..1000000", i, *ref.Weight)
			}
			b.Weight = int(*ref.Weight)
		}
		rule.totalWeight += b.Weight
		rule.Backends = append(rule.Backends, b)
	}
	return rule, nil
}

// hostnameRE is the Gateway API's Hostname: RFC 1123 labels, optionally a first `*.` label.
var hostnameRE = regexp.MustCompile(`^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

func tlsEntries(hosts []string, rule *Rule, order int) ([]*entry, error) {
	if len(hosts) == 0 {
		return []*entry{{rule: rule, order: order}}, nil // v1alpha2: every SNI
	}
	var es []*entry
	for i, h := range hosts {
		if _, err := netip.ParseAddr(h); err == nil || !hostnameRE.MatchString(h) || len(h) > 253 {
			return nil, fmt.Errorf("hostnames[%d]: %q is not a hostname (lower-case RFC 1123 labels, optionally a first label *.; no IP)", i, h)
		}
		e := &entry{host: h, rule: rule, order: order}
		if suffix, ok := strings.CutPrefix(h, "*"); ok {
			e.host, e.wildcard = suffix, true
		}
		es = append(es, e)
	}
	return es, nil
}

// attach adds a route's entries to each Service port its parentRefs name, for every caller,
// when the route is in the Service's namespace or in the waypoint's (httproute.Scope); a parent
// in a third namespace is recorded as out of scope instead.
func (t *Table) attach(svcs httproute.Services, waypointNS, kind string, meta httproute.Metadata, parents []httproute.ParentRef, es []*entry) {
	ns := meta.Namespace
	for _, p := range parents {
		if !p.IsService() {
			continue // a Gateway's route, not the mesh's
		}
		pns := ns
		if p.Namespace != nil {
			pns = *p.Namespace
		}
		svc := svcs.Service(pns, p.Name)
		if svc == nil {
			continue // not attached: no such Service (yet)
		}
		scope, ok := httproute.Scope(ns, pns, waypointNS)
		if !ok {
			t.outOfScope = append(t.outOfScope, httproute.OutOfScope{Kind: kind, Namespace: ns, Name: meta.Name, Service: pns + "/" + p.Name})
			continue
		}
		for _, port := range svc.Ports {
			if (p.Port != nil && int32(port.Port) != *p.Port) || (p.SectionName != nil && port.Name != *p.SectionName) {
				continue
			}
			k := portKey{ns: pns, name: p.Name, port: port.Port}
			pr := t.ports[k]
			if pr == nil {
				pr = &portRoutes{}
				t.ports[k] = pr
			}
			s := &pr.tcp
			if kind == "TLSRoute" {
				s = &pr.tls
			}
			if scope == httproute.ServiceNamespace {
				s.serviceNS = append(s.serviceNS, es...)
			} else {
				s.waypointNS = append(s.waypointNS, es...)
			}
		}
	}
}
