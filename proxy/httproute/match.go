package httproute

import (
	"net/http"
	"net/url"
	"regexp"
	"strings"
)

// pathKind ranks a path match as Istio sorts them (pilot/pkg/config/kube/gateway/conversion.go
// sortHTTPRoutes, getURIRank): Exact over PathPrefix over RegularExpression.
type pathKind int

const (
	pathRegex pathKind = iota + 1
	pathPrefix
	pathExact
)

// valueMatch is a compiled header or query parameter condition.
type valueMatch struct {
	name  string // canonical header key, or the query parameter's name
	exact string
	re    *regexp.Regexp // nil: exact
}

func (m *valueMatch) ok(v string, present bool) bool {
	if !present {
		return false
	}
	if m.re != nil {
		return m.re.MatchString(v)
	}
	return v == m.exact
}

// match is one compiled match of a rule: the conditions and where it sorts.
type match struct {
	kind    pathKind
	path    string // Exact: the path; PathPrefix: the prefix without its trailing slash ("" is "/")
	pathRe  *regexp.Regexp
	method  string
	headers []valueMatch
	query   []valueMatch
	grpc    bool // a GRPCRoute's match: path carries /service/method, see grpcPath

	// GRPCRoute precedence: characters in service and method.
	svcLen, methodLen int

	rule  *Rule
	order int // position over every route's rules and matches, after route age and name
}

// matches reports whether r (with its normalized path) meets every condition.
func (m *match) matches(r *http.Request, path string, query url.Values) bool {
	switch m.kind {
	case pathExact:
		if path != m.path {
			return false
		}
	case pathPrefix:
		if !prefixMatches(path, m.path) {
			return false
		}
	case pathRegex:
		if !m.pathRe.MatchString(path) {
			return false
		}
	}
	if m.method != "" && r.Method != m.method {
		return false
	}
	for i := range m.headers {
		h := &m.headers[i]
		vs, ok := r.Header[h.name]
		if !h.ok(strings.Join(vs, ","), ok) {
			return false
		}
	}
	if len(m.query) > 0 {
		for i := range m.query {
			q := &m.query[i]
			vs, ok := query[q.name]
			v := ""
			if ok && len(vs) > 0 {
				v = vs[0] // the first value, as Envoy's query parameter matcher
			}
			if !q.ok(v, ok) {
				return false
			}
		}
	}
	return true
}

// prefixMatches is PathPrefix on path segments: "/v2" matches "/v2", "/v2/" and "/v2/x", not
// "/v2x". prefix has no trailing slash; "" matches everything.
func prefixMatches(path, prefix string) bool {
	if prefix == "" {
		return true
	}
	if !strings.HasPrefix(path, prefix) {
		return false
	}
	return len(path) == len(prefix) || path[len(prefix)] == '/'
}

// less orders HTTPRoute matches by the spec's precedence (httproute_types.go, HTTPRouteRule
// Matches): Exact path, then the longest prefix, then a method, then more header matches, then
// more query matches; RegularExpression (implementation-specific) after prefixes, longer
// patterns first, as Istio. Ties keep route age, route name, then rule and match order.
func less(a, b *match) bool {
	if a.grpc || b.grpc {
		return lessGRPC(a, b)
	}
	switch {
	case a.kind != b.kind:
		return a.kind > b.kind
	case a.pathLen() != b.pathLen():
		return a.pathLen() > b.pathLen()
	case (a.method == "") != (b.method == ""):
		return a.method != ""
	case len(a.headers) != len(b.headers):
		return len(a.headers) > len(b.headers)
	case len(a.query) != len(b.query):
		return len(a.query) > len(b.query)
	}
	return a.order < b.order
}

func (m *match) pathLen() int {
	if m.kind == pathRegex {
		return len(m.pathRe.String())
	}
	return len(m.path)
}

// lessGRPC orders GRPCRoute matches (grpcroute_types.go, GRPCRouteRule Matches): more characters
// in the service, then in the method, then more header matches (hostnames do not apply to
// Service parents).
func lessGRPC(a, b *match) bool {
	switch {
	case a.svcLen != b.svcLen:
		return a.svcLen > b.svcLen
	case a.methodLen != b.methodLen:
		return a.methodLen > b.methodLen
	case len(a.headers) != len(b.headers):
		return len(a.headers) > len(b.headers)
	}
	return a.order < b.order
}
