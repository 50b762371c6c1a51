// Package authz enforces Istio AuthorizationPolicy the way a waypoint does: only policies that
// target the waypoint's Gateway, the destination Service, or the istio-waypoint GatewayClass (from
// the root namespace) apply (targetRefs; the legacy targetRef only when targetRefs is empty; a
// ServiceEntry target applies to nothing, detour knowing no ServiceEntries); CUSTOM first (a
// request its rules match goes to the ext_authz provider it names: see Decision.Custom; matched
// before request authentication, see DecideCustom), then DENY, then ALLOW (if any ALLOW applies, one must match); AUDIT only marks the decision. A policy annotated
// `istio.io/dry-run: "true"` is evaluated and its would-be outcome reported, never enforced.
//
// An attribute the stream cannot give (HTTP fields, request principals and JWT claims on an
// opaque TCP stream) makes an ALLOW rule unmatchable and is ignored in a DENY rule, as Istio
// does: both directions fail closed. An HTTP request without a token has no request principal.
package authz

import (
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

// Policy is one AuthorizationPolicy object.
type Policy struct {
	Namespace, Name string
	Spec            *secv1beta1.AuthorizationPolicy
	// DryRun: the policy is evaluated and reported in Decision.DryRun, never enforced (Istio's
	// istio.io/dry-run annotation; see DryRun).
	DryRun bool
}

// DryRunAnnotation marks a policy as evaluated but not enforced.
const DryRunAnnotation = "istio.io/dry-run"

// DryRun reads the istio.io/dry-run annotation as istiod does (strconv.ParseBool); a value it
// cannot parse leaves the policy enforced, failing closed.
func DryRun(annotations map[string]string) bool {
	v, err := strconv.ParseBool(annotations[DryRunAnnotation])
	return err == nil && v
}

func (p *Policy) id() string { return p.Namespace + "/" + p.Name }

// Waypoint says which Gateway this waypoint is, for targetRefs.
type Waypoint struct {
	Namespace, Gateway string
	RootNamespace      string // default istio-system
}

// Request is what a policy can look at.
type Request struct {
	Principal string     // peer SPIFFE ID without "spiffe://": cluster.local/ns/x/sa/y; "" if none
	SourceIP  netip.Addr // the original client (Forwarded)
	RemoteIP  netip.Addr // X-Forwarded-For's client for HTTP; zero means SourceIP
	DestIP    netip.Addr
	DestPort  uint16
	SNI       string
	Service   Service      // the destination service
	HTTP      *HTTPRequest // nil for an opaque stream
}

// Principal is a SPIFFE ID in the form Istio's policies name it (source.principal,
// principals): the trust domain and path, without "spiffe://". "" stays "".
func Principal(spiffeID string) string { return strings.TrimPrefix(spiffeID, "spiffe://") }

// Service names the destination.
type Service struct{ Namespace, Name string }

// HTTPRequest holds the L7 attributes.
type HTTPRequest struct {
	Host, Method, Path string
	Header             http.Header
	JWT                *JWT // the validated token (RequestAuthentication); nil: none
}

// Decision is the outcome and who made it.
type Decision struct {
	Allow  bool
	Policy string   // namespace/name of the deciding policy; "" when none applied
	Reason string   // for logs and refusals
	Audit  []string // AUDIT policies that matched
	// DryRun is the would-be outcome of each dry-run policy that applies, "namespace/name: allow"
	// or "namespace/name: deny"; none of them took part in the decision.
	DryRun []string
	// Custom is set when an enforced CUSTOM policy matched and names a usable provider. Allow is
	// then false, so a caller that calls no provider denies, as istiod does for an unknown one; a
	// caller that calls it (Envoy's waypoint runs the ext_authz filter before jwt_authn and every
	// other authorization filter: pilot listener_waypoint.go buildWaypointHTTPFilters) goes on
	// once the provider allows: to Custom.Then (Decide), or to request authentication and
	// DecideLocal (DecideCustom).
	Custom *Custom
}

// Custom is a CUSTOM policy's call for an ext_authz check.
type Custom struct {
	Provider string   // the mesh config's extension provider the policy names
	Policy   string   // namespace/name of the CUSTOM policy that matched
	Then     Decision // Decide: the DENY and ALLOW policies' decision, which applies if the provider allows
}

// Engine holds the policies of one config. Immutable.
type Engine struct {
	wp       Waypoint
	policies []*Policy
	all      bool // policies apply to every destination (DenyAll)
}

// New builds an engine for the waypoint wp.
func New(wp Waypoint, policies []*Policy) *Engine {
	if wp.RootNamespace == "" {
		wp.RootNamespace = "istio-system"
	}
	return &Engine{wp: wp, policies: policies}
}

// Decide evaluates the policies that apply to req: DecideCustom, then (when no CUSTOM policy
// denied) DecideLocal, carried in Custom.Then when a provider is to be asked. A waypoint that
// validates tokens between the two phases calls them on their own (see DecideCustom).
func (e *Engine) Decide(req *Request) Decision {
	d := e.DecideCustom(req)
	if !d.Allow && d.Custom == nil {
		d.DryRun = append(d.DryRun, e.dryRun(req, false)...)
		return d
	}
	local := e.DecideLocal(req)
	local.DryRun = append(d.DryRun, local.DryRun...)
	if d.Custom != nil {
		d.DryRun, d.Audit = local.DryRun, local.Audit
		d.Custom.Then = local
		return d
	}
	return local
}

// DecideCustom is the CUSTOM phase alone, as Istio's waypoint runs it: the CUSTOM policies'
// shadow RBAC filter and ext_authz come first in its HTTP chain, before jwt_authn (pilot
// listener_waypoint.go buildWaypointHTTPFilters: authzCustomBuilder, then authnBuilder, then
// authzBuilder), so they see no token. The rules are matched as for a request without one, whatever
// req.HTTP.JWT holds: requestPrincipals and request.auth.* never match, notRequestPrincipals always
// does (istiod's validation refuses those fields in a CUSTOM policy; a static config can still
// hold them). Allow is true when no enforced CUSTOM policy matches; Custom is set when one matches
// and names a usable provider; else the decision denies. DryRun has the dry-run CUSTOM policies.
func (e *Engine) DecideCustom(req *Request) Decision {
	req = withoutToken(req)
	d := Decision{Allow: true, DryRun: e.dryRun(req, true)}
	if p := e.custom(req); p != nil {
		d.Allow, d.Policy, d.Reason = false, p.id(), customReason(p)
		if prov, why := e.provider(req.Service, p); why != "" {
			d.Reason = "denied by CUSTOM policy " + p.id() + ": " + why
		} else {
			d.Custom = &Custom{Provider: prov, Policy: p.id()}
		}
	}
	return d
}

// DecideLocal is the phase after request authentication (Istio's authzBuilder): AUDIT marks,
// then DENY, then ALLOW, on req with its token; DryRun has the dry-run policies of those
// actions. It ignores CUSTOM policies: DecideCustom decided them.
func (e *Engine) DecideLocal(req *Request) Decision {
	d := e.local(req)
	d.DryRun = e.dryRun(req, false)
	for _, p := range e.enforced(req.Service, secv1beta1.AuthorizationPolicy_AUDIT) {
		if matchPolicy(p, req, secv1beta1.AuthorizationPolicy_AUDIT) {
			d.Audit = append(d.Audit, p.id())
		}
	}
	return d
}

// withoutToken is req as a filter before jwt_authn sees it: no validated token.
func withoutToken(req *Request) *Request {
	if req.HTTP == nil || req.HTTP.JWT == nil {
		return req
	}
	r, h := *req, *req.HTTP
	h.JWT = nil
	r.HTTP = &h
	return &r
}

// local is the DENY and ALLOW policies' decision.
func (e *Engine) local(req *Request) Decision {
	var d Decision
	for _, p := range e.enforced(req.Service, secv1beta1.AuthorizationPolicy_DENY) {
		if matchPolicy(p, req, secv1beta1.AuthorizationPolicy_DENY) {
			d.Policy, d.Reason = p.id(), "denied by DENY policy "+p.id()
			return d
		}
	}
	var names []string
	for _, p := range e.enforced(req.Service, secv1beta1.AuthorizationPolicy_ALLOW) {
		if privilegeOnly(p) {
			continue
		}
		names = append(names, p.id())
		if matchPolicy(p, req, secv1beta1.AuthorizationPolicy_ALLOW) {
			d.Allow, d.Policy, d.Reason = true, p.id(), "allowed by ALLOW policy "+p.id()
			return d
		}
	}
	if len(names) > 0 {
		d.Reason = "no ALLOW policy matched (" + strings.Join(names, ", ") + ")"
		return d
	}
	d.Allow, d.Reason = true, "no policy applies"
	return d
}

// enforced lists the policies with action that apply to dst and are not dry-run.
func (e *Engine) enforced(dst Service, action secv1beta1.AuthorizationPolicy_Action) []*Policy {
	var out []*Policy
	for _, p := range e.policies {
		if !p.DryRun && p.Spec.GetAction() == action && e.applies(p, dst) {
			out = append(out, p)
		}
	}
	return out
}

// custom is the first enforced CUSTOM policy whose rules match req, matched as istiod's shadow
// RBAC filter in front of ext_authz does: as DENY rules (an attribute the stream lacks is
// ignored, as in any DENY rule).
func (e *Engine) custom(req *Request) *Policy {
	for _, p := range e.enforced(req.Service, secv1beta1.AuthorizationPolicy_CUSTOM) {
		if matchPolicy(p, req, secv1beta1.AuthorizationPolicy_DENY) {
			return p
		}
	}
	return nil
}

func customReason(p *Policy) string {
	return fmt.Sprintf("denied by CUSTOM policy %s: no usable ext_authz provider %q is configured, so its matching requests are denied (as istiod does for an unknown provider)",
		p.id(), p.Spec.GetProvider().GetName())
}

// provider is the provider p names, or why none can be called, as istiod's builder decides
// (pilot/pkg/security/authz/builder/builder.go, extauthz.go getExtAuthz): a policy that names
// none, or CUSTOM policies on one destination (dry-run ones included) naming more than one
// provider (istiod's PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS is off by default), deny
// what they match.
func (e *Engine) provider(dst Service, p *Policy) (string, string) {
	name := p.Spec.GetProvider().GetName()
	if name == "" {
		return "", "it names no provider, so its matching requests are denied (as istiod does)"
	}
	for _, q := range e.policies {
		if q.Spec.GetAction() == secv1beta1.AuthorizationPolicy_CUSTOM && e.applies(q, dst) && q.Spec.GetProvider().GetName() != name {
			return "", fmt.Sprintf("CUSTOM policies %s and %s name different providers (%q, %q), so their matching requests are denied (as istiod does without PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS)",
				p.id(), q.id(), name, q.Spec.GetProvider().GetName())
		}
	}
	return name, ""
}

// dryRun is the would-be outcome of each dry-run policy that applies, the CUSTOM ones (custom)
// or the others: an ALLOW allows what it matches and denies the rest; a DENY or CUSTOM (no
// provider) denies what it matches; an AUDIT decides nothing and is not reported.
func (e *Engine) dryRun(req *Request, custom bool) []string {
	var out []string
	for _, p := range e.policies {
		if !p.DryRun || !e.applies(p, req.Service) || (p.Spec.GetAction() == secv1beta1.AuthorizationPolicy_CUSTOM) != custom {
			continue
		}
		var allow bool
		switch p.Spec.GetAction() {
		case secv1beta1.AuthorizationPolicy_ALLOW:
			allow = matchPolicy(p, req, secv1beta1.AuthorizationPolicy_ALLOW)
		case secv1beta1.AuthorizationPolicy_DENY, secv1beta1.AuthorizationPolicy_CUSTOM:
			allow = !matchPolicy(p, req, secv1beta1.AuthorizationPolicy_DENY)
		default:
			continue
		}
		verdict := "deny"
		if allow {
			verdict = "allow"
		}
		out = append(out, p.id()+": "+verdict)
	}
	return out
}

// applies reports whether p targets this waypoint, the destination service, or all waypoints.
func (e *Engine) applies(p *Policy, dst Service) bool {
	if e.all {
		return true
	}
	return Attached(p.Spec.GetTargetRefs(), p.Spec.GetTargetRef(), p.Namespace, e.wp, dst)
}

// Attached reports whether a policy in namespace ns with these targetRefs (and the legacy
// targetRef, which counts only without targetRefs, as in istiod) binds at waypoint wp for
// dst: Istio's ShouldAttachPolicy for a waypoint (pilot/pkg/model/policyattachment.go), which
// never uses a selector. AuthorizationPolicy and RequestAuthentication attach alike.
func Attached(refs []*typev1beta1.PolicyTargetReference, legacy *typev1beta1.PolicyTargetReference, ns string, wp Waypoint, dst Service) bool {
	if wp.RootNamespace == "" {
		wp.RootNamespace = "istio-system"
	}
	if len(refs) == 0 && legacy != nil {
		refs = []*typev1beta1.PolicyTargetReference{legacy}
	}
	for _, r := range refs {
		if r.GetNamespace() != "" && r.GetNamespace() != ns {
			continue // cross-namespace references are not allowed
		}
		if targets(r, ns, wp, dst) {
			return true
		}
	}
	return false
}

func targets(r *typev1beta1.PolicyTargetReference, ns string, wp Waypoint, dst Service) bool {
	group, kind, name := r.GetGroup(), r.GetKind(), r.GetName()
	switch {
	case group == "gateway.networking.k8s.io" && kind == "Gateway":
		return ns == wp.Namespace && name == wp.Gateway
	case (group == "" || group == "core") && kind == "Service":
		return ns == dst.Namespace && name == dst.Name
	case group == "gateway.networking.k8s.io" && kind == "GatewayClass":
		return ns == wp.RootNamespace && name == "istio-waypoint"
	}
	// Anything else applies to nothing: in particular a ServiceEntry (detour discovers no
	// ServiceEntries, and a Service of the same name is another object).
	return false
}

// matchPolicy: a policy matches when any rule does; a policy with no rules matches nothing.
func matchPolicy(p *Policy, req *Request, action secv1beta1.AuthorizationPolicy_Action) bool {
	for _, r := range p.Spec.GetRules() {
		if matchRule(r, req, p.Namespace, action == secv1beta1.AuthorizationPolicy_DENY) {
			return true
		}
	}
	return false
}

// tri is a field's outcome: match, no match, or unknowable for this stream.
type tri int8

const (
	no tri = iota
	yes
	unknown
)

// matchRule: ns is the policy's namespace (a serviceAccounts entry without one names it).
func matchRule(r *secv1beta1.Rule, req *Request, ns string, deny bool) bool {
	ok := func(t tri) bool {
		if t == unknown {
			return deny // ignored in DENY, unmatchable in ALLOW
		}
		return t == yes
	}
	if len(r.GetFrom()) > 0 {
		any := false
		for _, f := range r.GetFrom() {
			if allOK(ok, sourceFields(f.GetSource(), req, ns)) {
				any = true
				break
			}
		}
		if !any {
			return false
		}
	}
	if len(r.GetTo()) > 0 {
		any := false
		for _, t := range r.GetTo() {
			if allOK(ok, operationFields(t.GetOperation(), req)) {
				any = true
				break
			}
		}
		if !any {
			return false
		}
	}
	for _, c := range r.GetWhen() {
		if !ok(condition(c, req)) {
			return false
		}
	}
	return true
}

func allOK(ok func(tri) bool, fields []tri) bool {
	for _, f := range fields {
		if !ok(f) {
			return false
		}
	}
	return true
}

// field matches values (any) and notValues (none) with match; empty lists don't constrain.
func field(values, notValues []string, match func(string) tri) tri {
	out := yes
	if len(values) > 0 {
		out = no
		for _, v := range values {
			switch match(v) {
			case yes:
				out = yes
			case unknown:
				return unknown
			}
			if out == yes {
				break
			}
		}
		if out == no {
			return no
		}
	}
	for _, v := range notValues {
		switch match(v) {
		case yes:
			return no
		case unknown:
			return unknown
		}
	}
	return out
}

func boolTri(b bool) tri {
	if b {
		return yes
	}
	return no
}

func sourceFields(s *secv1beta1.Source, req *Request, policyNS string) []tri {
	ns, sa, td := principalParts(req.Principal)
	serviceAccount := func(v string) tri {
		if !strings.Contains(v, "/") {
			v = policyNS + "/" + v // `<serviceaccount>` alone: the policy's namespace
		}
		return boolTri(v == ns+"/"+sa && sa != "")
	}
	remote := req.RemoteIP
	if !remote.IsValid() {
		remote = req.SourceIP
	}
	principals := requestPrincipals(req)
	return []tri{
		field(s.GetPrincipals(), s.GetNotPrincipals(), func(v string) tri { return boolTri(wildcard(v, req.Principal)) }),
		field(s.GetRequestPrincipals(), s.GetNotRequestPrincipals(), principals),
		field(s.GetNamespaces(), s.GetNotNamespaces(), func(v string) tri { return boolTri(wildcard(v, ns)) }),
		field(s.GetServiceAccounts(), s.GetNotServiceAccounts(), serviceAccount),
		field(s.GetTrustDomains(), s.GetNotTrustDomains(), func(v string) tri { return boolTri(wildcard(v, td)) }),
		field(s.GetIpBlocks(), s.GetNotIpBlocks(), func(v string) tri { return boolTri(inBlock(v, req.SourceIP)) }),
		field(s.GetRemoteIpBlocks(), s.GetNotRemoteIpBlocks(), func(v string) tri { return boolTri(inBlock(v, remote)) }),
	}
}

func operationFields(o *secv1beta1.Operation, req *Request) []tri {
	h := req.HTTP
	httpOnly := func(m func(string) bool) func(string) tri {
		return func(v string) tri {
			if h == nil {
				return unknown
			}
			return boolTri(m(v))
		}
	}
	return []tri{
		field(o.GetPorts(), o.GetNotPorts(), func(v string) tri { return boolTri(v == strconv.Itoa(int(req.DestPort))) }),
		// Envoy matches :authority as sent, port included, case-insensitively (istiod's
		// HostMatcher): "example.com" does not match "example.com:8080"; "example.com:*" does.
		field(o.GetHosts(), o.GetNotHosts(), httpOnly(func(v string) bool { return wildcardFold(v, h.Host) })),
		field(o.GetMethods(), o.GetNotMethods(), httpOnly(func(v string) bool { return v == h.Method })),
		field(o.GetPaths(), o.GetNotPaths(), httpOnly(func(v string) bool { return matchPath(v, h.Path) })),
	}
}

// condition evaluates a `when` condition for the keys a waypoint supports.
func condition(c *secv1beta1.Condition, req *Request) tri {
	key := c.GetKey()
	ns, _, td := principalParts(req.Principal)
	str := func(got string) func(string) tri { return func(v string) tri { return boolTri(wildcard(v, got)) } }
	switch {
	case key == "source.trustDomain": // istio pilot/pkg/security/authz/model/model.go attrSrcTrustDomain
		return field(c.GetValues(), c.GetNotValues(), str(td))
	case key == "source.ip":
		return field(c.GetValues(), c.GetNotValues(), func(v string) tri { return boolTri(inBlock(v, req.SourceIP)) })
	case key == "remote.ip":
		ip := req.RemoteIP
		if !ip.IsValid() {
			ip = req.SourceIP
		}
		return field(c.GetValues(), c.GetNotValues(), func(v string) tri { return boolTri(inBlock(v, ip)) })
	case key == "source.namespace":
		return field(c.GetValues(), c.GetNotValues(), str(ns))
	case key == "source.principal":
		return field(c.GetValues(), c.GetNotValues(), str(req.Principal))
	case key == "destination.ip":
		return field(c.GetValues(), c.GetNotValues(), func(v string) tri { return boolTri(inBlock(v, req.DestIP)) })
	case key == "destination.port":
		return field(c.GetValues(), c.GetNotValues(), str(strconv.Itoa(int(req.DestPort))))
	case key == "connection.sni":
		return field(c.GetValues(), c.GetNotValues(), str(req.SNI))
	case strings.HasPrefix(key, "request.headers[") && strings.HasSuffix(key, "]"):
		if req.HTTP == nil {
			return unknown
		}
		// Envoy's header matcher sees a repeated header as its values joined with ",".
		got := req.HTTP.Header.Values(key[len("request.headers[") : len(key)-1])
		joined := strings.Join(got, ",")
		return field(c.GetValues(), c.GetNotValues(), func(v string) tri { return boolTri(len(got) > 0 && wildcard(v, joined)) })
	}
	if t, ok := jwtCondition(key, c.GetValues(), c.GetNotValues(), req); ok {
		return t
	}
	return unknown // a key a waypoint does not support

}

// wildcard is Istio's string match: "*" (present), "*suffix", "prefix*", or exact.
func wildcard(pattern, v string) bool {
	switch {
	case pattern == "*":
		return v != ""
	case strings.HasPrefix(pattern, "*"):
		return strings.HasSuffix(v, pattern[1:])
	case strings.HasSuffix(pattern, "*"):
		return strings.HasPrefix(v, pattern[:len(pattern)-1])
	}
	return pattern == v
}

func wildcardFold(pattern, v string) bool {
	return wildcard(strings.ToLower(pattern), strings.ToLower(v))
}

// matchPath supports Istio's wildcards and its path templates, which istiod hands to Envoy's
// uri_template matcher ({*} becomes *, {**} becomes **: pilot/pkg/security/authz/matcher/template.go):
// {*} is one or more path characters without "/", {**} zero or more with "/", anywhere in the
// template (Istio's TestAuthz_PathTemplating: /store/{**}/cart matches /store//cart and
// /store/a/b/cart, not /store/cart; /allow/admin/{**} matches /allow/admin/, not /allow/admin).
func matchPath(pattern, path string) bool {
	if !strings.Contains(pattern, "{*") {
		return wildcard(pattern, path)
	}
	return matchTemplate(pattern, path)
}

// matchTemplate matches in O(len(s) x operators), whatever the path: the set of positions of s
// reachable after each piece of the template is swept once (a backtracking matcher is
// exponential in the operators on a client's path).
func matchTemplate(p, s string) bool {
	reach := make([]bool, len(s)+1)
	reach[0] = true
	next := make([]bool, len(s)+1)
	lit := func(l string) {
		clear(next)
		for q, ok := range reach {
			if ok && strings.HasPrefix(s[q:], l) {
				next[q+len(l)] = true
			}
		}
		reach, next = next, reach
	}
	op := func(multi bool) { // {*}: one or more characters without "/"; {**}: zero or more with
		run := false // some reachable p < q with s[p:q] all operator characters
		for q := range next {
			if q > 0 {
				run = (run || reach[q-1]) && templateChar(s[q-1], multi)
			}
			next[q] = run || multi && reach[q]
		}
		reach, next = next, reach
	}
	for p != "" {
		i := strings.Index(p, "{*")
		if i < 0 {
			lit(p)
			break
		}
		lit(p[:i])
		switch p = p[i:]; {
		case strings.HasPrefix(p, "{**}"):
			op(true)
			p = p[4:]
		case strings.HasPrefix(p, "{*}"):
			op(false)
			p = p[3:]
		default: // "{*" not an operator: literal text
			lit("{*")
			p = p[2:]
		}
	}
	return reach[len(s)]
}

// templateChar is a character Envoy's uri_template operators match: RFC 3986 pchar (unreserved,
// %-escapes, sub-delims but "*", ":" and "@"), and "/" for {**}.
func templateChar(c byte, slash bool) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	case c == '/':
		return slash
	}
	return strings.IndexByte("-._~%!$&'()+,;:@=", c) >= 0
}

// RemoteIP is the client address X-Forwarded-For gives (remote.ip, remoteIpBlocks), as Envoy
// finds it with use_remote_address false (Istio's waypoint) and numTrustedProxies n: the
// (n+1)th address from the right of the header's values joined with ",". Fewer entries, or one
// that is not an IP: the zero Addr, meaning Request.SourceIP.
func RemoteIP(forwardedFor []string, n int) netip.Addr {
	var ips []string
	for _, v := range forwardedFor {
		ips = append(ips, strings.Split(v, ",")...)
	}
	if n < 0 || n >= len(ips) {
		return netip.Addr{}
	}
	ip, err := netip.ParseAddr(strings.TrimSpace(ips[len(ips)-1-n]))
	if err != nil {
		return netip.Addr{}
	}
	return ip.Unmap()
}

// inBlock matches an IP against "10.0.0.0/8" or "10.0.0.1".
func inBlock(block string, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	if p, err := netip.ParsePrefix(block); err == nil {
		return p.Contains(ip.Unmap())
	}
	if a, err := netip.ParseAddr(block); err == nil {
		return a.Unmap() == ip.Unmap()
	}
	return false
}

// principalParts splits td/ns/<ns>/sa/<sa>.
func principalParts(p string) (ns, sa, td string) {
	parts := strings.Split(p, "/")
	if len(parts) == 5 && parts[1] == "ns" && parts[3] == "sa" {
		return parts[2], parts[4], parts[0]
	}
	return "", "", ""
}

// String describes a decision for logs.
func (d Decision) String() string {
	verdict := "deny"
	if d.Allow {
		verdict = "allow"
	}
	return fmt.Sprintf("%s: %s", verdict, d.Reason)
}

// NeedsL7 reports whether a policy that applies to dst looks at an attribute only the stream's
// content gives (HTTP method, path, host or headers, the client IP from X-Forwarded-For, the TLS
// SNI): then the waypoint must inspect the stream before it can decide. Otherwise the decision is
// made once, at CONNECT time, and the bytes are only spliced.
func (e *Engine) NeedsL7(dst Service) bool {
	for _, p := range e.policies {
		if !e.applies(p, dst) || privilegeOnly(p) {
			continue
		}
		for _, r := range p.Spec.GetRules() {
			if ruleNeedsL7(r) {
				return true
			}
		}
	}
	return false
}

func ruleNeedsL7(r *secv1beta1.Rule) bool {
	for _, f := range r.GetFrom() {
		s := f.GetSource()
		if len(s.GetRemoteIpBlocks())+len(s.GetNotRemoteIpBlocks())+len(s.GetRequestPrincipals())+len(s.GetNotRequestPrincipals()) > 0 {
			return true
		}
	}
	for _, t := range r.GetTo() {
		o := t.GetOperation()
		if len(o.GetHosts())+len(o.GetNotHosts())+len(o.GetMethods())+len(o.GetNotMethods())+len(o.GetPaths())+len(o.GetNotPaths()) > 0 {
			return true
		}
	}
	for _, c := range r.GetWhen() {
		k := c.GetKey()
		if k == "remote.ip" || k == "connection.sni" || strings.HasPrefix(k, "request.headers[") || strings.HasPrefix(k, "request.auth.") {
			return true
		}
	}
	return false
}

// Grant decides a request for a privilege rather than for traffic (a developer asking the
// waypoint to STEAL or MIRROR a service: req.HTTP.Method names the privilege). It fails closed:
// DENY policies apply as usual, and only an ALLOW rule whose operation names the method
// explicitly grants it, so an ALLOW written for ordinary traffic (no methods, or GET/POST) never
// hands out a privilege. No such rule: denied.
func (e *Engine) Grant(req *Request) Decision {
	if p := e.custom(req); p != nil {
		return Decision{Policy: p.id(), Reason: customReason(p)}
	}
	for _, p := range e.enforced(req.Service, secv1beta1.AuthorizationPolicy_DENY) {
		if matchPolicy(p, req, secv1beta1.AuthorizationPolicy_DENY) {
			return Decision{Policy: p.id(), Reason: "denied by DENY policy " + p.id()}
		}
	}
	for _, p := range e.enforced(req.Service, secv1beta1.AuthorizationPolicy_ALLOW) {
		for _, r := range p.Spec.GetRules() {
			if namesMethod(r, req.HTTP.Method) && matchRule(r, req, p.Namespace, false) {
				return Decision{Allow: true, Policy: p.id(), Reason: "granted by ALLOW policy " + p.id()}
			}
		}
	}
	return Decision{Reason: "no ALLOW policy names method " + req.HTTP.Method + " for this principal, host and path"}
}

// namesMethod: every operation of the rule lists method explicitly (a rule with no operation, or
// one operation without methods, grants no privilege).
func namesMethod(r *secv1beta1.Rule, method string) bool {
	if len(r.GetTo()) == 0 {
		return false
	}
	for _, t := range r.GetTo() {
		found := false
		for _, m := range t.GetOperation().GetMethods() {
			found = found || m == method
		}
		if !found {
			return false
		}
	}
	return true
}

// PrivilegeMethods are the methods of detour's privileges (see Grant); no traffic uses them.
var PrivilegeMethods = []string{"STEAL", "MIRROR", "IMPERSONATE", "LIST"}

// privilegeOnly: an ALLOW policy every rule of which grants only privileges. It is about
// sessions, not traffic: it takes no part in traffic decisions, so granting a developer STEAL
// on the waypoint's Gateway never turns the Gateway's traffic into allow-listed traffic.
func privilegeOnly(p *Policy) bool {
	if p.Spec.GetAction() != secv1beta1.AuthorizationPolicy_ALLOW || len(p.Spec.GetRules()) == 0 {
		return false
	}
	for _, r := range p.Spec.GetRules() {
		if len(r.GetTo()) == 0 {
			return false
		}
		for _, t := range r.GetTo() {
			ms := t.GetOperation().GetMethods()
			if len(ms) == 0 {
				return false
			}
			for _, m := range ms {
				if !slices.Contains(PrivilegeMethods, m) {
					return false
				}
			}
		}
	}
	return true
}

// DenyAll is an engine that refuses every request, in the name of policy id (namespace/name):
// what a waypoint answers before it has seen the cluster's policies.
func DenyAll(id string) *Engine {
	ns, name, _ := strings.Cut(id, "/")
	return &Engine{policies: []*Policy{{Namespace: ns, Name: name, Spec: &secv1beta1.AuthorizationPolicy{
		Action: secv1beta1.AuthorizationPolicy_DENY,
		Rules:  []*secv1beta1.Rule{{}},
	}}}, all: true}
}
