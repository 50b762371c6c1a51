// Package httproute is the waypoint's HTTP route table: the Gateway API HTTPRoutes and
// GRPCRoutes attached to Services (GAMMA: parentRefs of kind Service, as istiod turns them into
// a waypoint's routes in pilot/pkg/config/kube/gateway), compiled once per snapshot into one
// ordered matcher per service port. A request to a port with routes is matched in the spec's
// precedence and gets its rule's filters and a weighted backend; a request no rule matches gets
// 404; a port with no route is forwarded as before (Table.Match says which).
package httproute

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
)

// Table holds the compiled routes of one snapshot. Immutable; safe for concurrent use.
type Table struct {
	ports      map[portKey]*portRoutes
	outOfScope []OutOfScope
}

type portKey struct {
	ns, name string
	port     uint16
}

type portRoutes struct {
	http, grpc routeSet
}

// routeSet is the routes of one kind on one service port, applied to every caller, as Istio's
// waypoint selects them (pilot/pkg/networking/core/listener_waypoint.go,
// getVirtualServiceForWaypoint: only routes in the service's namespace or in the waypoint's own
// namespace; buildWaypointInboundHTTPRouteConfig appends the selected VirtualServices' routes in
// the order pilot/pkg/model/push_context.go VirtualServicesForGateway lists them, the waypoint's
// namespace first). Routes in any other namespace are not applied (Table.OutOfScope names them).
type routeSet struct {
	// waypointNS holds the routes in the waypoint's namespace when the Service is in another;
	// serviceNS those in the Service's namespace. Compile only; sort orders each by the spec's
	// precedence and joins them into all.
	waypointNS, serviceNS []*match
	// all is what Match walks: waypointNS, then serviceNS. Immutable once compiled.
	all []*match
}

func (t *Table) port(k portKey) *portRoutes {
	p := t.ports[k]
	if p == nil {
		p = &portRoutes{}
		t.ports[k] = p
	}
	return p
}

// sort orders each namespace's routes by the spec's precedence (Istio merges one namespace's
// routes for a host into one VirtualService and sorts them: pilot/pkg/config/kube/gateway
// route_collections.go mergeHTTPRoutes) and puts the waypoint's namespace's first: a request
// one of them matches never reaches the Service's own routes, one none matches does.
func (p *portRoutes) sort() {
	for _, s := range []*routeSet{&p.http, &p.grpc} {
		slices.SortStableFunc(s.waypointNS, cmpMatch)
		slices.SortStableFunc(s.serviceNS, cmpMatch)
		s.all = slices.Concat(s.waypointNS, s.serviceNS)
		s.waypointNS, s.serviceNS = nil, nil
	}
}

func cmpMatch(a, b *match) int {
	switch {
	case less(a, b):
		return -1
	case less(b, a):
		return 1
	}
	return 0
}

// OutOfScope is a route a parentRef attaches to a known Service that the waypoint does not
// apply: the route is neither in the Service's namespace nor in the waypoint's. Istio's waypoint
// leaves such a route out too (listener_waypoint.go getVirtualServiceForWaypoint; it is a
// consumer route, GEP-1294, which only sidecars apply to their own namespace's callers).
type OutOfScope struct {
	Kind, Namespace, Name string // the route
	Service               string // the parent Service, namespace/name
}

func (o OutOfScope) String() string {
	return fmt.Sprintf("%s %s/%s (parent Service %s)", o.Kind, o.Namespace, o.Name, o.Service)
}

// OutOfScope lists the routes left out because of their namespace, in Compile's order.
func (t *Table) OutOfScope() []OutOfScope {
	if t == nil {
		return nil
	}
	return t.outOfScope
}

// Matched is the rule a request matched and the PathPrefix it matched by (no trailing slash),
// which ReplacePrefixMatch replaces.
type Matched struct {
	Rule   *Rule
	Prefix string
}

// Attached reports whether any route applies to the service port.
func (t *Table) Attached(namespace, name string, port uint16) bool {
	if t == nil {
		return false
	}
	_, ok := t.ports[portKey{namespace, name, port}]
	return ok
}

// Match finds the rule for r, addressed to service namespace/name on port; path is r's
// normalized, escaped path. The same routes apply to every caller. attached is false when no
// route applies to the port (forward as without routes); a nil Matched.Rule with attached true
// is the spec's 404. gRPC requests are matched against GRPCRoutes, then HTTPRoutes: the two
// are never merged into one precedence order.
func (t *Table) Match(namespace, name string, port uint16, r *http.Request, path string, grpc bool) (m Matched, attached bool) {
	if t == nil {
		return Matched{}, false
	}
	p := t.ports[portKey{namespace, name, port}]
	if p == nil {
		return Matched{}, false
	}
	var query url.Values // parsed once, only when a match needs it
	sets := [][]*match{p.http.all}
	if grpc {
		sets = [][]*match{p.grpc.all, p.http.all}
	}
	for _, ms := range sets {
		if len(ms) > 0 {
			attached = true
		}
		for _, m := range ms {
			if len(m.query) > 0 && query == nil {
				query = r.URL.Query()
			}
			if m.matches(r, path, query) {
				out := Matched{Rule: m.rule}
				if m.kind == pathPrefix {
					out.Prefix = m.path
				}
				return out, true
			}
		}
	}
	return Matched{}, attached
}
