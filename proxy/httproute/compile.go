package httproute

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/detour-mesh/detour/proxy/route"
)

// Services finds a Service by namespace and name (a *route.Table does).
type Services interface {
	Service(namespace, name string) *route.Service
}

// Compile builds the table of routes attached to services (parentRefs of kind Service),
// once per snapshot, for the waypoint in namespace waypointNS: a route applies, to every
// caller, to a parent Service in its own namespace or, when the route is in waypointNS, to a
// parent Service in any namespace; a route in a third namespace is not applied and is listed by
// Table.OutOfScope (Istio's waypoint does the same: listener_waypoint.go
// getVirtualServiceForWaypoint). A route that cannot be compiled (an unsupported filter, a bad regular
// expression or duration) is left out whole, as Istio leaves it unaccepted, and named in the
// returned error; the others still apply. A backendRef that names no known Service is kept and
// answers 500 (Istio's InvalidDestinationNotFound). Cross-namespace backendRefs need no
// ReferenceGrant: Istio does not enforce them for mesh parents (route_collections.go passes
// enforceRefGrant = !mesh).
func Compile(svcs Services, waypointNS string, https []*HTTPRoute, grpcs []*GRPCRoute) (*Table, error) {
	c := &compiler{svcs: svcs, waypointNS: waypointNS, t: &Table{ports: map[portKey]*portRoutes{}}}
	type routeRef struct {
		meta Metadata
		http *HTTPRoute
		grpc *GRPCRoute
	}
	var all []routeRef
	for _, r := range https {
		all = append(all, routeRef{meta: r.Metadata, http: r})
	}
	for _, r := range grpcs {
		all = append(all, routeRef{meta: r.Metadata, grpc: r})
	}
	// The oldest route first, then by namespace/name: the spec's tie-breaks.
	slices.SortStableFunc(all, func(a, b routeRef) int {
		if c := a.meta.CreationTimestamp.Compare(b.meta.CreationTimestamp); c != 0 {
			return c
		}
		return cmp.Or(strings.Compare(a.meta.Namespace, b.meta.Namespace), strings.Compare(a.meta.Name, b.meta.Name))
	})
	var errs []error
	for _, r := range all {
		var err error
		if r.http != nil {
			err = c.httpRoute(r.http)
		} else {
			err = c.grpcRoute(r.grpc)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range c.t.ports {
		p.sort()
	}
	return c.t, errors.Join(errs...)
}

type compiler struct {
	svcs       Services
	waypointNS string
	t          *Table
	order      int
}

func (c *compiler) httpRoute(hr *HTTPRoute) error {
	name := "HTTPRoute " + hr.Metadata.Namespace + "/" + hr.Metadata.Name
	if hr.Metadata.Name == "" || hr.Metadata.Namespace == "" {
		return fmt.Errorf("httproute: an HTTPRoute needs metadata.name and metadata.namespace")
	}
	var ms []*match
	for i := range hr.Spec.Rules {
		rule, rms, err := c.httpRule(hr, i)
		if err != nil {
			return fmt.Errorf("httproute: %w", &RouteError{Kind: "HTTPRoute", Namespace: hr.Metadata.Namespace, Name: hr.Metadata.Name, Err: fmt.Errorf("rules[%d]: %w", i, err)})
		}
		rule.Route = fmt.Sprintf("%s#%d", name, i)
		ms = append(ms, rms...)
	}
	return c.attach("HTTPRoute", hr.Metadata, hr.Spec.ParentRefs, ms, false)
}

func (c *compiler) grpcRoute(gr *GRPCRoute) error {
	name := "GRPCRoute " + gr.Metadata.Namespace + "/" + gr.Metadata.Name
	if gr.Metadata.Name == "" || gr.Metadata.Namespace == "" {
		return fmt.Errorf("httproute: a GRPCRoute needs metadata.name and metadata.namespace")
	}
	var ms []*match
	for i := range gr.Spec.Rules {
		rule, rms, err := c.grpcRule(gr, i)
		if err != nil {
			return fmt.Errorf("httproute: %w", &RouteError{Kind: "GRPCRoute", Namespace: gr.Metadata.Namespace, Name: gr.Metadata.Name, Err: fmt.Errorf("rules[%d]: %w", i, err)})
		}
		rule.Route = fmt.Sprintf("%s#%d", name, i)
		ms = append(ms, rms...)
	}
	return c.attach("GRPCRoute", gr.Metadata, gr.Spec.ParentRefs, ms, true)
}

// attach adds a route's matches to each Service port its parentRefs name, for every caller,
// when the route is in the Service's namespace or in the waypoint's (see Compile); a parent in
// a third namespace is recorded as out of scope instead.
func (c *compiler) attach(kind string, meta Metadata, parents []ParentRef, ms []*match, grpc bool) error {
	ns := meta.Namespace
	for _, p := range parents {
		if !isService(p.Group, p.Kind) {
			continue // a Gateway's route, not the mesh's
		}
		pns := ns
		if p.Namespace != nil {
			pns = *p.Namespace
		}
		svc := c.svcs.Service(pns, p.Name)
		if svc == nil {
			continue // not attached: no such Service (yet)
		}
		scope, ok := Scope(ns, pns, c.waypointNS)
		if !ok {
			c.t.outOfScope = append(c.t.outOfScope, OutOfScope{Kind: kind, Namespace: ns, Name: meta.Name, Service: pns + "/" + p.Name})
			continue
		}
		for _, port := range svc.Ports {
			if p.Port != nil && int32(port.Port) != *p.Port {
				continue
			}
			if p.SectionName != nil && port.Name != *p.SectionName {
				continue
			}
			pr := c.t.port(portKey{ns: pns, name: p.Name, port: port.Port})
			set := &pr.http
			if grpc {
				set = &pr.grpc
			}
			if scope == ServiceNamespace {
				set.serviceNS = append(set.serviceNS, ms...)
			} else {
				set.waypointNS = append(set.waypointNS, ms...)
			}
		}
	}
	return nil
}

// RouteScope says why a waypoint applies a route to a parent Service.
type RouteScope int

const (
	// ServiceNamespace: the route is in the Service's namespace (a producer route).
	ServiceNamespace RouteScope = iota
	// WaypointNamespace: the route is in the waypoint's namespace, the Service in another; it
	// comes before the Service's own routes.
	WaypointNamespace
)

// Scope decides whether the waypoint in waypointNS applies a route in routeNS to a parent
// Service in serviceNS, as Istio's waypoint does (pilot/pkg/networking/core/listener_waypoint.go,
// getVirtualServiceForWaypoint: the route's namespace is the service's or the waypoint's; ok is
// false otherwise). proxy/l4route decides with it too.
func Scope(routeNS, serviceNS, waypointNS string) (scope RouteScope, ok bool) {
	switch routeNS {
	case serviceNS:
		return ServiceNamespace, true
	case waypointNS:
		return WaypointNamespace, true
	}
	return 0, false
}

// IsService reports whether p names a Service (group "" or "core", kind Service, the defaults):
// a mesh route's parent. Other parents (Gateways) are not a waypoint's.
func (p ParentRef) IsService() bool { return isService(p.Group, p.Kind) }

func isService(group, kind *string) bool {
	g, k := "", "Service"
	if group != nil {
		g = *group
	}
	if kind != nil {
		k = *kind
	}
	return (g == "" || g == "core") && k == "Service"
}

func (c *compiler) httpRule(hr *HTTPRoute, i int) (*Rule, []*match, error) {
	r := hr.Spec.Rules[i]
	rule := &Rule{}
	if err := c.filters(rule, hr.Metadata.Namespace, r.Filters, false); err != nil {
		return nil, nil, err
	}
	if err := c.backends(rule, hr.Metadata.Namespace, r.BackendRefs, false); err != nil {
		return nil, nil, err
	}
	if err := timeouts(rule, r.Timeouts, r.Retry); err != nil {
		return nil, nil, err
	}
	matches := r.Matches
	if len(matches) == 0 {
		matches = []HTTPMatch{{}} // the default: PathPrefix /
	}
	var out []*match
	for j, m := range matches {
		cm, err := compileHTTPMatch(m)
		if err != nil {
			return nil, nil, fmt.Errorf("matches[%d]: %w", j, err)
		}
		if needsPrefix(rule) && cm.kind != pathPrefix {
			return nil, nil, fmt.Errorf("matches[%d]: ReplacePrefixMatch needs a PathPrefix match", j)
		}
		cm.rule, cm.order = rule, c.order
		c.order++
		out = append(out, cm)
	}
	return rule, out, nil
}

func needsPrefix(r *Rule) bool {
	return (r.Rewrite != nil && r.Rewrite.path != nil && r.Rewrite.path.prefix != nil) ||
		(r.Redirect != nil && r.Redirect.path != nil && r.Redirect.path.prefix != nil)
}

func compileHTTPMatch(m HTTPMatch) (*match, error) {
	cm := &match{kind: pathPrefix}
	if p := m.Path; p != nil {
		typ, value := "PathPrefix", "/"
		if p.Type != nil {
			typ = *p.Type
		}
		if p.Value != nil {
			value = *p.Value
		}
		switch typ {
		case "Exact":
			if !strings.HasPrefix(value, "/") {
				return nil, fmt.Errorf("path %q does not start with /", value)
			}
			cm.kind, cm.path = pathExact, value
		case "PathPrefix":
			if !strings.HasPrefix(value, "/") {
				return nil, fmt.Errorf("path %q does not start with /", value)
			}
			cm.path = strings.TrimRight(value, "/")
		case "RegularExpression":
			re, err := fullRegexp(value)
			if err != nil {
				return nil, fmt.Errorf("path: %w", err)
			}
			cm.kind, cm.pathRe = pathRegex, re
		default:
			return nil, fmt.Errorf("path type %q is not Exact, PathPrefix or RegularExpression", typ)
		}
	}
	if m.Method != nil {
		cm.method = *m.Method
	}
	var err error
	if cm.headers, err = valueMatches(m.Headers, true); err != nil {
		return nil, fmt.Errorf("headers: %w", err)
	}
	if cm.query, err = valueMatches(m.QueryParams, false); err != nil {
		return nil, fmt.Errorf("queryParams: %w", err)
	}
	return cm, nil
}

// fullRegexp compiles a Gateway API RegularExpression (RE2, as Envoy's) to match the whole value.
func fullRegexp(expr string) (*regexp.Regexp, error) {
	re, err := regexp.Compile("^(?:" + expr + ")$")
	if err != nil {
		return nil, fmt.Errorf("regular expression %q: %w", expr, err)
	}
	return re, nil
}

func valueMatches(vs []ValueMatch, header bool) ([]valueMatch, error) {
	var out []valueMatch
	for _, v := range vs {
		if v.Name == "" {
			return nil, errors.New("a match needs a name")
		}
		m := valueMatch{name: v.Name, exact: v.Value}
		if header {
			m.name = http.CanonicalHeaderKey(v.Name)
		}
		typ := "Exact"
		if v.Type != nil {
			typ = *v.Type
		}
		switch typ {
		case "Exact":
		case "RegularExpression":
			re, err := fullRegexp(v.Value)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", v.Name, err)
			}
			m.re = re
		default:
			return nil, fmt.Errorf("%s: type %q is not Exact or RegularExpression", v.Name, typ)
		}
		out = append(out, m)
	}
	return out, nil
}

func (c *compiler) grpcRule(gr *GRPCRoute, i int) (*Rule, []*match, error) {
	r := gr.Spec.Rules[i]
	rule := &Rule{GRPC: true}
	if err := c.filters(rule, gr.Metadata.Namespace, r.Filters, true); err != nil {
		return nil, nil, err
	}
	if err := c.backends(rule, gr.Metadata.Namespace, r.BackendRefs, true); err != nil {
		return nil, nil, err
	}
	matches := r.Matches
	if len(matches) == 0 {
		matches = []GRPCMatch{{}} // every gRPC request
	}
	var out []*match
	for j, m := range matches {
		cm, err := compileGRPCMatch(m)
		if err != nil {
			return nil, nil, fmt.Errorf("matches[%d]: %w", j, err)
		}
		cm.rule, cm.order = rule, c.order
		c.order++
		out = append(out, cm)
	}
	return rule, out, nil
}

// compileGRPCMatch turns a method match into a condition on the path /service/method.
func compileGRPCMatch(m GRPCMatch) (*match, error) {
	cm := &match{grpc: true}
	var err error
	if cm.headers, err = valueMatches(m.Headers, true); err != nil {
		return nil, fmt.Errorf("headers: %w", err)
	}
	mm := m.Method
	if mm == nil {
		return cm, nil
	}
	typ, svc, method := "Exact", "", ""
	if mm.Type != nil {
		typ = *mm.Type
	}
	if mm.Service != nil {
		svc = *mm.Service
	}
	if mm.Method != nil {
		method = *mm.Method
	}
	if svc == "" && method == "" {
		return nil, errors.New("method: a method match needs service or method")
	}
	cm.svcLen, cm.methodLen = len(svc), len(method)
	switch typ {
	case "Exact":
		switch {
		case svc != "" && method != "":
			cm.kind, cm.path = pathExact, "/"+svc+"/"+method
		case svc != "":
			cm.kind, cm.path = pathPrefix, "/"+svc
		default:
			cm.kind, cm.pathRe = pathRegex, regexp.MustCompile("^/[^/]+/"+regexp.QuoteMeta(method)+"$")
		}
	case "RegularExpression":
		if svc == "" {
			svc = `[^/]+`
		}
		if method == "" {
			method = `[^/]+`
		}
		re, err := regexp.Compile("^/(?:" + svc + ")/(?:" + method + ")$")
		if err != nil {
			return nil, fmt.Errorf("method: %w", err)
		}
		cm.kind, cm.pathRe = pathRegex, re
	default:
		return nil, fmt.Errorf("method: type %q is not Exact or RegularExpression", typ)
	}
	return cm, nil
}

// filters compiles a rule's filters; grpc allows only what GRPCRoute has.
func (c *compiler) filters(rule *Rule, ns string, fs []Filter, grpc bool) error {
	for i, f := range fs {
		if err := c.filter(rule, ns, f, grpc); err != nil {
			return fmt.Errorf("filters[%d]: %w", i, err)
		}
	}
	if rule.Redirect != nil && rule.Rewrite != nil {
		return errors.New("filters: RequestRedirect and URLRewrite cannot both be set")
	}
	return nil
}

func (c *compiler) filter(rule *Rule, ns string, f Filter, grpc bool) error {
	set := 0
	for _, p := range []bool{f.RequestHeaderModifier != nil, f.ResponseHeaderModifier != nil, f.RequestMirror != nil, f.RequestRedirect != nil, f.URLRewrite != nil, f.CORS != nil} {
		if p {
			set++
		}
	}
	if set != 1 {
		return fmt.Errorf("type %s: exactly one filter field must be set", f.Type)
	}
	switch {
	case f.Type == "RequestHeaderModifier" && f.RequestHeaderModifier != nil:
		rule.RequestHeaders = compileHeaderMod(f.RequestHeaderModifier)
	case f.Type == "ResponseHeaderModifier" && f.ResponseHeaderModifier != nil:
		rule.ResponseHeaders = compileHeaderMod(f.ResponseHeaderModifier)
	case f.Type == "RequestMirror" && f.RequestMirror != nil:
		m, err := c.mirror(ns, f.RequestMirror)
		if err != nil {
			return err
		}
		rule.Mirrors = append(rule.Mirrors, m)
	case !grpc && f.Type == "RequestRedirect" && f.RequestRedirect != nil:
		r, err := compileRedirect(f.RequestRedirect)
		if err != nil {
			return err
		}
		rule.Redirect = r
	case !grpc && f.Type == "URLRewrite" && f.URLRewrite != nil:
		rw := &RewriteAction{}
		if f.URLRewrite.Hostname != nil {
			rw.Hostname = *f.URLRewrite.Hostname
		}
		p, err := compilePathModifier(f.URLRewrite.Path)
		if err != nil {
			return err
		}
		rw.path = p
		rule.Rewrite = rw
	case !grpc && f.Type == "CORS" && f.CORS != nil:
		if rule.CORS != nil {
			return errors.New("CORS filter cannot be repeated")
		}
		a, err := compileCORS(f.CORS)
		if err != nil {
			return err
		}
		rule.CORS = a
	default:
		return fmt.Errorf("filter type %q is not supported here (detour implements RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, and for HTTPRoute RequestRedirect, URLRewrite and CORS)", f.Type)
	}
	return nil
}

func compileRedirect(r *Redirect) (*RedirectAction, error) {
	a := &RedirectAction{Status: 302}
	if r.Scheme != nil {
		if *r.Scheme != "http" && *r.Scheme != "https" {
			return nil, fmt.Errorf("redirect scheme %q is not http or https", *r.Scheme)
		}
		a.Scheme = *r.Scheme
	}
	if r.Hostname != nil {
		a.Hostname = *r.Hostname
	}
	if r.Port != nil {
		if *r.Port < 1 || *r.Port > 65535 {
			return nil, fmt.Errorf("redirect port %d is out of range", *r.Port)
		}
		a.Port = int(*r.Port)
	}
	if r.StatusCode != nil {
		switch *r.StatusCode {
		case 301, 302, 303, 307, 308:
			a.Status = *r.StatusCode
		default:
			return nil, fmt.Errorf("redirect statusCode %d is not 301, 302, 303, 307 or 308", *r.StatusCode)
		}
	}
	p, err := compilePathModifier(r.Path)
	if err != nil {
		return nil, err
	}
	a.path = p
	return a, nil
}

func compilePathModifier(p *PathModifier) (*pathRewrite, error) {
	if p == nil {
		return nil, nil
	}
	switch {
	case p.Type == "ReplaceFullPath" && p.ReplaceFullPath != nil && p.ReplacePrefixMatch == nil:
		return &pathRewrite{full: p.ReplaceFullPath}, nil
	case p.Type == "ReplacePrefixMatch" && p.ReplacePrefixMatch != nil && p.ReplaceFullPath == nil:
		v := strings.TrimRight(*p.ReplacePrefixMatch, "/")
		return &pathRewrite{prefix: &v}, nil
	}
	return nil, fmt.Errorf("path modifier type %q needs exactly its own field (replaceFullPath or replacePrefixMatch)", p.Type)
}

// backendService checks a backend (or mirror) reference; invalid says why it cannot be used.
func (c *compiler) backendService(ns string, ref BackendObjectRef) (bns string, port uint16, invalid string) {
	return BackendService(c.svcs, ns, ref)
}

// BackendService checks a backendRef of a route in namespace ns against svcs: the backend's
// namespace and port, and why it cannot be used (not a core Service, a hostname for a name, no
// port, unknown, no such port), "" when it can. proxy/l4route checks its backends with it.
func BackendService(svcs Services, ns string, ref BackendObjectRef) (bns string, port uint16, invalid string) {
	bns = ns
	if ref.Namespace != nil {
		bns = *ref.Namespace
	}
	switch {
	case !isService(ref.Group, ref.Kind):
		return bns, 0, "backendRef is not a core Service"
	case strings.Contains(ref.Name, "."):
		return bns, 0, "service name invalid; the name of the Service must be used, not the hostname"
	case ref.Port == nil:
		return bns, 0, "backendRef to a Service needs a port"
	case *ref.Port < 1 || *ref.Port > 65535:
		return bns, 0, "backendRef port out of range"
	}
	port = uint16(*ref.Port)
	svc := svcs.Service(bns, ref.Name)
	if svc == nil {
		return bns, port, fmt.Sprintf("backend(%s.%s) not found", ref.Name, bns)
	}
	if !slices.ContainsFunc(svc.Ports, func(p route.Port) bool { return p.Port == port }) {
		return bns, port, fmt.Sprintf("backend(%s.%s) has no port %d", ref.Name, bns, port)
	}
	return bns, port, ""
}

func (c *compiler) backends(rule *Rule, ns string, refs []BackendRef, grpc bool) error {
	for i, ref := range refs {
		b := Backend{Name: ref.Name, Weight: 1}
		b.Namespace, b.Port, b.Invalid = c.backendService(ns, ref.BackendObjectRef)
		if ref.Weight != nil {
			if *ref.Weight < 0 || *ref.Weight > 1000000 {
				return fmt.Errorf("backendRefs[%d]: weight %d is outside 0..1000000", i, *ref.Weight)
			}
			b.Weight = int(*ref.Weight)
		}
		for j, f := range ref.Filters {
			var br Rule
			if err := c.filter(&br, ns, f, grpc); err != nil {
				return fmt.Errorf("backendRefs[%d].filters[%d]: %w", i, j, err)
			}
			if br.Redirect != nil || br.Rewrite != nil || len(br.Mirrors) > 0 {
				return fmt.Errorf("backendRefs[%d].filters[%d]: detour applies only header modifiers on a backendRef", i, j)
			}
			if br.RequestHeaders != nil {
				b.RequestHeaders = br.RequestHeaders
			}
			if br.ResponseHeaders != nil {
				b.ResponseHeaders = br.ResponseHeaders
			}
		}
		rule.totalWeight += b.Weight
		rule.Backends = append(rule.Backends, b)
	}
	return nil
}

func (c *compiler) mirror(ns string, m *Mirror) (MirrorAction, error) {
	a := MirrorAction{Name: m.BackendRef.Name, Numerator: 100, Denominator: 100}
	if m.Percent != nil && m.Fraction != nil {
		return a, errors.New("requestMirror: percent and fraction cannot both be set")
	}
	if m.Percent != nil {
		if *m.Percent < 0 || *m.Percent > 100 {
			return a, fmt.Errorf("requestMirror: percent %d is outside 0..100", *m.Percent)
		}
		a.Numerator = int(*m.Percent)
	}
	if f := m.Fraction; f != nil {
		a.Numerator = int(f.Numerator)
		if f.Denominator != nil {
			a.Denominator = int(*f.Denominator)
		}
		if a.Denominator < 1 || a.Numerator < 0 || a.Numerator > a.Denominator {
			return a, fmt.Errorf("requestMirror: fraction %d/%d is not within 0..1", a.Numerator, a.Denominator)
		}
	}
	a.Namespace, a.Port, a.Invalid = c.backendService(ns, m.BackendRef)
	return a, nil
}

func timeouts(rule *Rule, t *Timeouts, r *Retry) error {
	parse := func(field string, s *string) (time.Duration, error) {
		if s == nil {
			return 0, nil
		}
		d, err := time.ParseDuration(*s)
		if err != nil || d < 0 {
			return 0, fmt.Errorf("timeouts.%s %q is not a duration", field, *s)
		}
		return d, nil
	}
	var err error
	if t != nil {
		if rule.Timeout, err = parse("request", t.Request); err != nil {
			return err
		}
		if rule.BackendTimeout, err = parse("backendRequest", t.BackendRequest); err != nil {
			return err
		}
		if rule.Timeout > 0 && rule.BackendTimeout > rule.Timeout {
			return fmt.Errorf("timeouts.backendRequest %s is longer than timeouts.request %s", rule.BackendTimeout, rule.Timeout)
		}
	}
	if r != nil {
		p := &RetryPolicy{Attempts: 2, Codes: r.Codes} // Istio's default attempts
		if r.Attempts != nil {
			p.Attempts = *r.Attempts
		}
		if p.Attempts < 0 || p.Attempts > 10 {
			return fmt.Errorf("retry.attempts %d is outside 0..10", p.Attempts)
		}
		if p.Backoff, err = parse("retry.backoff", r.Backoff); err != nil {
			return err
		}
		rule.Retry = p
	}
	return nil
}
