// Package httproute is the waypoint's HTTP route table: the Gateway API HTTPRoutes and
// GRPCRoutes attached to Services (GAMMA: parentRefs of kind Service, as istiod turns them into
// a waypoint's routes in pilot/pkg/config/kube/gateway), compiled once per snapshot into one
// ordered matcher per service port. A request to a port with routes is matched in the spec's
// precedence and gets its rule's filters and a weighted backend; a request no rule matches gets
// 404; a port with no route is forwarded as before (Table.Match says which).
package httproute

import (
	"net/http"
	"net/url"
	"slices"
)

// Table holds the compiled routes of one snapshot. Immutable; safe for concurrent use.
type Table struct {
	ports map[portKey]*portRoutes
}

type portKey struct {
	ns, name string
	port     uint16
}

type portRoutes struct {
	http, grpc routeSet
}

// routeSet: the producer routes (every caller) and the consumer routes by the caller's
// namespace (those callers only, in place of the producer routes).
type routeSet struct {
	producer []*match
	consumer map[string][]*match
}

func (t *Table) port(k portKey) *portRoutes {
	p := t.ports[k]
	if p == nil {
		p = &portRoutes{}
		t.ports[k] = p
	}
	return p
}

func (p *portRoutes) sort() {
	for _, s := range []*routeSet{&p.http, &p.grpc} {
		slices.SortStableFunc(s.producer, cmpMatch)
		for _, ms := range s.consumer {
			slices.SortStableFunc(ms, cmpMatch)
		}
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

func (s *routeSet) for_(callerNS string) []*match {
	if ms, ok := s.consumer[callerNS]; ok {
		return ms
	}
	return s.producer
}

// Matched is the rule a request matched and the PathPrefix it matched by (no trailing slash),
// which ReplacePrefixMatch replaces.
type Matched struct {
	Rule   *Rule
	Prefix string
}

// Attached reports whether any route is attached to the service port (for any caller).
func (t *Table) Attached(namespace, name string, port uint16) bool {
	if t == nil {
		return false
	}
	_, ok := t.ports[portKey{namespace, name, port}]
	return ok
}

// Match finds the rule for r, addressed to service namespace/name on port, from a caller in
// callerNS; path is r's normalized, escaped path. attached is false when no route applies to
// the port for this caller (forward as without routes); a nil Matched.Rule with attached true
// is the spec's 404. gRPC requests are matched against GRPCRoutes, then HTTPRoutes: the two
// are never merged into one precedence order.
func (t *Table) Match(namespace, name string, port uint16, callerNS string, r *http.Request, path string, grpc bool) (m Matched, attached bool) {
	if t == nil {
		return Matched{}, false
	}
	p := t.ports[portKey{namespace, name, port}]
	if p == nil {
		return Matched{}, false
	}
	var query url.Values // parsed once, only when a match needs it
	sets := [][]*match{p.http.for_(callerNS)}
	if grpc {
		sets = [][]*match{p.grpc.for_(callerNS), sets[0]}
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
