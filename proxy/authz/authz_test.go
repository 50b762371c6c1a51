package authz

import (
	"encoding/json"
	"net/http"
	"net/netip"
	"testing"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

var wp = Waypoint{Namespace: "demo", Gateway: "detour"}

const (
	ALLOW  = secv1beta1.AuthorizationPolicy_ALLOW
	DENY   = secv1beta1.AuthorizationPolicy_DENY
	AUDIT  = secv1beta1.AuthorizationPolicy_AUDIT
	CUSTOM = secv1beta1.AuthorizationPolicy_CUSTOM
)

type rule = secv1beta1.Rule
type src = secv1beta1.Source
type op = secv1beta1.Operation
type cond = secv1beta1.Condition

var (
	toGateway  = []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}}
	toEcho     = []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "echo"}}
	toOther    = []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "other"}}
	toClass    = []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "GatewayClass", Name: "istio-waypoint"}}
	selectorOn = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "echo"}}
)

func pol(name string, action secv1beta1.AuthorizationPolicy_Action, refs []*typev1beta1.PolicyTargetReference, rules ...*rule) *Policy {
	return &Policy{Namespace: "demo", Name: name, Spec: &secv1beta1.AuthorizationPolicy{Action: action, TargetRefs: refs, Rules: rules}}
}

func from(s *src) *rule     { return &rule{From: []*secv1beta1.Rule_From{{Source: s}}} }
func to(o *op) *rule        { return &rule{To: []*secv1beta1.Rule_To{{Operation: o}}} }
func when(c ...*cond) *rule { return &rule{When: c} }
func tcp() *Request         { return req(nil) }
func httpReq(method, path string) *Request {
	return req(&HTTPRequest{Host: "echo.demo.svc.cluster.local:80", Method: method, Path: path, Header: http.Header{"X-Dev": {"alice"}}})
}

// withJWT gives r a validated token: principal issuer/subject, audiences foo and bar, presenter
// client, groups [dev admin], nested.key "value1", iat a number.
func withJWT(r *Request) *Request {
	r.HTTP.JWT = &JWT{Principal: "issuer/subject", Audiences: []string{"foo", "bar"}, Presenter: "client", Claims: map[string]any{
		"iss": "issuer", "sub": "subject", "groups": []any{"dev", "admin"}, "nested": map[string]any{"key": "value1"}, "iat": json.Number("1"),
	}}
	return r
}

func req(h *HTTPRequest) *Request {
	return &Request{
		Principal: "cluster.local/ns/default/sa/sleep",
		SourceIP:  netip.MustParseAddr("10.244.1.5"),
		DestIP:    netip.MustParseAddr("10.96.0.10"),
		DestPort:  80,
		SNI:       "echo.example.com",
		Service:   Service{Namespace: "demo", Name: "echo"},
		HTTP:      h,
	}
}

func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name     string
		policies []*Policy
		req      *Request
		allow    bool
		by       string
	}{
		// Applicability.
		{"no policies: allow", nil, tcp(), true, ""},
		{"ALLOW targeting another service does not apply", []*Policy{pol("p", ALLOW, toOther, from(&src{Principals: []string{"nobody"}}))}, tcp(), true, ""},
		{"selector policies are not for waypoints", []*Policy{{Namespace: "demo", Name: "sel", Spec: &secv1beta1.AuthorizationPolicy{Selector: selectorOn, Action: DENY, Rules: []*rule{{}}}}}, tcp(), true, ""},
		{"policy without target does not apply", []*Policy{pol("none", DENY, nil, &rule{})}, tcp(), true, ""},
		{"targetRef to the Gateway applies", []*Policy{pol("gw", DENY, toGateway, &rule{})}, tcp(), false, "demo/gw"},
		{"targetRef to the Service applies", []*Policy{pol("svc", DENY, toEcho, &rule{})}, tcp(), false, "demo/svc"},
		{"legacy targetRef applies", []*Policy{{Namespace: "demo", Name: "legacy", Spec: &secv1beta1.AuthorizationPolicy{Action: DENY, TargetRef: toEcho[0], Rules: []*rule{{}}}}}, tcp(), false, "demo/legacy"},
		{"Gateway of another name does not apply", []*Policy{pol("gw2", DENY, []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "other"}}, &rule{})}, tcp(), true, ""},
		{"Service in another namespace does not apply", []*Policy{{Namespace: "other", Name: "x", Spec: &secv1beta1.AuthorizationPolicy{Action: DENY, TargetRefs: toEcho, Rules: []*rule{{}}}}}, tcp(), true, ""},
		{"cross-namespace targetRef is ignored", []*Policy{pol("xns", DENY, []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "echo", Namespace: "elsewhere"}}, &rule{})}, tcp(), true, ""},
		{"GatewayClass from the root namespace applies", []*Policy{{Namespace: "istio-system", Name: "all", Spec: &secv1beta1.AuthorizationPolicy{Action: DENY, TargetRefs: toClass, Rules: []*rule{{}}}}}, tcp(), false, "istio-system/all"},
		{"GatewayClass from another namespace does not apply", []*Policy{pol("cls", DENY, toClass, &rule{})}, tcp(), true, ""},
		// Action order.
		{"CUSTOM matching its rule denies", []*Policy{pol("ext", CUSTOM, toEcho, &rule{}), pol("ok", ALLOW, toEcho, &rule{})}, tcp(), false, "demo/ext"},
		{"DENY over ALLOW", []*Policy{pol("a", ALLOW, toEcho, &rule{}), pol("d", DENY, toEcho, &rule{})}, tcp(), false, "demo/d"},
		{"ALLOW with no match denies", []*Policy{pol("a", ALLOW, toEcho, from(&src{Namespaces: []string{"prod"}}))}, tcp(), false, ""},
		{"one of several ALLOW matching allows", []*Policy{pol("a1", ALLOW, toEcho, from(&src{Namespaces: []string{"prod"}})), pol("a2", ALLOW, toGateway, from(&src{Namespaces: []string{"default"}}))}, tcp(), true, "demo/a2"},
		{"ALLOW with no rules allows nothing", []*Policy{pol("a", ALLOW, toEcho)}, tcp(), false, ""},
		{"ALLOW with an empty rule allows all", []*Policy{pol("a", ALLOW, toEcho, &rule{})}, tcp(), true, "demo/a"},
		{"DENY with no rules denies nothing", []*Policy{pol("d", DENY, toEcho)}, tcp(), true, ""},
		{"AUDIT does not decide", []*Policy{pol("au", AUDIT, toEcho, &rule{})}, tcp(), true, ""},
		// Source fields.
		{"principal exact", []*Policy{pol("a", ALLOW, toEcho, from(&src{Principals: []string{"cluster.local/ns/default/sa/sleep"}}))}, tcp(), true, "demo/a"},
		{"principal prefix", []*Policy{pol("a", ALLOW, toEcho, from(&src{Principals: []string{"cluster.local/ns/default/*"}}))}, tcp(), true, "demo/a"},
		{"principal suffix", []*Policy{pol("a", ALLOW, toEcho, from(&src{Principals: []string{"*/sa/sleep"}}))}, tcp(), true, "demo/a"},
		{"principal presence, none given", []*Policy{pol("a", ALLOW, toEcho, from(&src{Principals: []string{"*"}}))}, func() *Request { r := tcp(); r.Principal = ""; return r }(), false, ""},
		{"notPrincipals excludes", []*Policy{pol("d", DENY, toEcho, from(&src{NotPrincipals: []string{"cluster.local/ns/default/sa/sleep"}}))}, tcp(), true, ""},
		{"namespaces", []*Policy{pol("d", DENY, toEcho, from(&src{Namespaces: []string{"default"}}))}, tcp(), false, "demo/d"},
		{"notNamespaces", []*Policy{pol("a", ALLOW, toEcho, from(&src{NotNamespaces: []string{"default"}}))}, tcp(), false, ""},
		{"serviceAccounts", []*Policy{pol("a", ALLOW, toEcho, from(&src{ServiceAccounts: []string{"default/sleep"}}))}, tcp(), true, "demo/a"},
		{"trustDomains", []*Policy{pol("a", ALLOW, toEcho, from(&src{TrustDomains: []string{"other.org"}}))}, tcp(), false, ""},
		{"ipBlocks CIDR", []*Policy{pol("d", DENY, toEcho, from(&src{IpBlocks: []string{"10.244.0.0/16"}}))}, tcp(), false, "demo/d"},
		{"ipBlocks single IP no match", []*Policy{pol("d", DENY, toEcho, from(&src{IpBlocks: []string{"10.244.1.6"}}))}, tcp(), true, ""},
		{"notIpBlocks", []*Policy{pol("a", ALLOW, toEcho, from(&src{NotIpBlocks: []string{"10.244.1.0/24"}}))}, tcp(), false, ""},
		{"remoteIpBlocks fall back to the source IP", []*Policy{pol("a", ALLOW, toEcho, from(&src{RemoteIpBlocks: []string{"10.244.1.5"}}))}, tcp(), true, "demo/a"},
		{"requestPrincipals: no token, no ALLOW", []*Policy{pol("a", ALLOW, toEcho, from(&src{RequestPrincipals: []string{"*"}}))}, httpReq("GET", "/"), false, ""},
		{"requestPrincipals: a token's principal", []*Policy{pol("a", ALLOW, toEcho, from(&src{RequestPrincipals: []string{"issuer/subject"}}))}, withJWT(httpReq("GET", "/")), true, "demo/a"},
		{"requestPrincipals: prefix", []*Policy{pol("a", ALLOW, toEcho, from(&src{RequestPrincipals: []string{"issuer/*"}}))}, withJWT(httpReq("GET", "/")), true, "demo/a"},
		{"requestPrincipals: another principal", []*Policy{pol("a", ALLOW, toEcho, from(&src{RequestPrincipals: []string{"issuer/other"}}))}, withJWT(httpReq("GET", "/")), false, ""},
		{"requestPrincipals never match an ALLOW on an opaque stream", []*Policy{pol("a", ALLOW, toEcho, from(&src{RequestPrincipals: []string{"*"}}))}, tcp(), false, ""},
		{"requestPrincipals are ignored in a DENY on an opaque stream", []*Policy{pol("d", DENY, toEcho, from(&src{RequestPrincipals: []string{"issuer/subject"}, Namespaces: []string{"default"}}))}, tcp(), false, "demo/d"},
		{"requestPrincipals: no token does not match a DENY", []*Policy{pol("d", DENY, toEcho, from(&src{RequestPrincipals: []string{"issuer/subject"}}))}, httpReq("GET", "/"), true, ""},
		{"notRequestPrincipals *: no token is denied", []*Policy{pol("d", DENY, toEcho, from(&src{NotRequestPrincipals: []string{"*"}}))}, httpReq("GET", "/"), false, "demo/d"},
		{"notRequestPrincipals *: a token passes", []*Policy{pol("d", DENY, toEcho, from(&src{NotRequestPrincipals: []string{"*"}}))}, withJWT(httpReq("GET", "/")), true, ""},
		{"notRequestPrincipals on an opaque stream: DENY ignores it", []*Policy{pol("d", DENY, toEcho, from(&src{NotRequestPrincipals: []string{"*"}}))}, tcp(), false, "demo/d"},
		{"two sources are ORed", []*Policy{pol("a", ALLOW, toEcho, &rule{From: []*secv1beta1.Rule_From{{Source: &src{Namespaces: []string{"prod"}}}, {Source: &src{Namespaces: []string{"default"}}}}})}, tcp(), true, "demo/a"},
		{"fields of one source are ANDed", []*Policy{pol("a", ALLOW, toEcho, from(&src{Namespaces: []string{"default"}, IpBlocks: []string{"192.168.0.0/16"}}))}, tcp(), false, ""},
		// Operation fields.
		{"ports", []*Policy{pol("a", ALLOW, toEcho, to(&op{Ports: []string{"80"}}))}, tcp(), true, "demo/a"},
		{"notPorts", []*Policy{pol("d", DENY, toEcho, to(&op{NotPorts: []string{"80"}}))}, tcp(), true, ""},
		{"methods on HTTP", []*Policy{pol("a", ALLOW, toEcho, to(&op{Methods: []string{"GET"}}))}, httpReq("GET", "/x"), true, "demo/a"},
		{"methods on HTTP, other method", []*Policy{pol("a", ALLOW, toEcho, to(&op{Methods: []string{"GET"}}))}, httpReq("POST", "/x"), false, ""},
		{"HTTP-only ALLOW never matches TCP", []*Policy{pol("a", ALLOW, toEcho, to(&op{Methods: []string{"GET"}}))}, tcp(), false, ""},
		{"HTTP-only DENY field ignored on TCP: denies", []*Policy{pol("d", DENY, toEcho, to(&op{Methods: []string{"DELETE"}, Ports: []string{"80"}}))}, tcp(), false, "demo/d"},
		{"paths exact", []*Policy{pol("a", ALLOW, toEcho, to(&op{Paths: []string{"/api/v1"}}))}, httpReq("GET", "/api/v1"), true, "demo/a"},
		{"paths prefix", []*Policy{pol("d", DENY, toEcho, to(&op{Paths: []string{"/admin/*"}}))}, httpReq("GET", "/admin/users"), false, "demo/d"},
		{"paths suffix", []*Policy{pol("a", ALLOW, toEcho, to(&op{Paths: []string{"*.png"}}))}, httpReq("GET", "/img/a.png"), true, "demo/a"},
		{"path template {*}", []*Policy{pol("a", ALLOW, toEcho, to(&op{Paths: []string{"/users/{*}/profile"}}))}, httpReq("GET", "/users/42/profile"), true, "demo/a"},
		{"path template {**}", []*Policy{pol("a", ALLOW, toEcho, to(&op{Paths: []string{"/files/{**}"}}))}, httpReq("GET", "/files/a/b/c"), true, "demo/a"},
		{"notPaths", []*Policy{pol("a", ALLOW, toEcho, to(&op{NotPaths: []string{"/private*"}}))}, httpReq("GET", "/private/x"), false, ""},
		{"hosts, case folded, port as sent", []*Policy{pol("a", ALLOW, toEcho, to(&op{Hosts: []string{"ECHO.demo.svc.cluster.local:80"}}))}, httpReq("GET", "/"), true, "demo/a"},
		{"hosts prefix wildcard", []*Policy{pol("a", ALLOW, toEcho, to(&op{Hosts: []string{"echo.demo.*"}}))}, httpReq("GET", "/"), true, "demo/a"},
		// Conditions.
		{"when request header", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.headers[x-dev]", Values: []string{"alice"}}))}, httpReq("GET", "/"), true, "demo/a"},
		{"when request header notValues", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.headers[X-Dev]", NotValues: []string{"ali*"}}))}, httpReq("GET", "/"), false, ""},
		{"when source.namespace", []*Policy{pol("d", DENY, toEcho, when(&cond{Key: "source.namespace", Values: []string{"default"}}))}, tcp(), false, "demo/d"},
		{"when source.ip", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "source.ip", Values: []string{"10.244.0.0/16"}}))}, tcp(), true, "demo/a"},
		{"when destination.port", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "destination.port", Values: []string{"443"}}))}, tcp(), false, ""},
		{"when connection.sni", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "connection.sni", Values: []string{"*.example.com"}}))}, tcp(), true, "demo/a"},
		{"when request.auth.claims: no token, no ALLOW", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.claims[groups]", Values: []string{"admin"}}))}, httpReq("GET", "/"), false, ""},
		{"when request.auth.claims: list claim, any element", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.claims[groups]", Values: []string{"admin"}}))}, withJWT(httpReq("GET", "/")), true, "demo/a"},
		{"when request.auth.claims: nested", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.claims[nested][key]", Values: []string{"value*"}}))}, withJWT(httpReq("GET", "/")), true, "demo/a"},
		{"when request.auth.claims: nested, absent", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.claims[nested][other]", Values: []string{"*"}}))}, withJWT(httpReq("GET", "/")), false, ""},
		{"when request.auth.claims: a number matches no string", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.claims[iat]", Values: []string{"1"}}))}, withJWT(httpReq("GET", "/")), false, ""},
		{"when request.auth.claims: malformed key never matches an ALLOW", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.claims[groups", Values: []string{"admin"}}))}, withJWT(httpReq("GET", "/")), false, ""},
		{"when request.auth.claims notValues", []*Policy{pol("d", DENY, toEcho, when(&cond{Key: "request.auth.claims[groups]", NotValues: []string{"admin"}}))}, withJWT(httpReq("GET", "/")), true, ""},
		{"when request.auth.principal", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.principal", Values: []string{"issuer/subject"}}))}, withJWT(httpReq("GET", "/")), true, "demo/a"},
		{"when request.auth.audiences", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.audiences", Values: []string{"bar"}}))}, withJWT(httpReq("GET", "/")), true, "demo/a"},
		{"when request.auth.presenter", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.presenter", Values: []string{"client"}}))}, withJWT(httpReq("GET", "/")), true, "demo/a"},
		{"when request.auth.presenter, other", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.auth.presenter", Values: []string{"other"}}))}, withJWT(httpReq("GET", "/")), false, ""},
		{"when request.auth.claims on an opaque stream: DENY ignores it", []*Policy{pol("d", DENY, toEcho, when(&cond{Key: "request.auth.claims[groups]", Values: []string{"admin"}}))}, tcp(), false, "demo/d"},
		{"when unsupported key is ignored in a DENY", []*Policy{pol("d", DENY, toEcho, when(&cond{Key: "experimental.envoy.filters.x", Values: []string{"y"}}))}, tcp(), false, "demo/d"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := New(wp, tc.policies).Decide(tc.req)
			if d.Allow != tc.allow || d.Policy != tc.by {
				t.Fatalf("got %v by %q, want allow=%v by %q", d, d.Policy, tc.allow, tc.by)
			}
		})
	}
}

func TestAuditAndReasons(t *testing.T) {
	e := New(wp, []*Policy{pol("au", AUDIT, toEcho, &rule{}), pol("a1", ALLOW, toEcho, from(&src{Namespaces: []string{"prod"}})), pol("a2", ALLOW, toGateway, from(&src{Namespaces: []string{"qa"}}))})
	d := e.Decide(tcp())
	if d.Allow || d.Reason != "no ALLOW policy matched (demo/a1, demo/a2)" || len(d.Audit) != 1 || d.Audit[0] != "demo/au" {
		t.Fatalf("got %+v", d)
	}
}

func TestNeedsL7(t *testing.T) {
	echo := Service{Namespace: "demo", Name: "echo"}
	cases := []struct {
		name string
		p    *Policy
		want bool
	}{
		{"principals only", pol("a", ALLOW, toEcho, from(&src{Principals: []string{"*"}})), false},
		{"ports only", pol("a", ALLOW, toEcho, to(&op{Ports: []string{"80"}})), false},
		{"source.ip condition", pol("a", DENY, toEcho, when(&cond{Key: "source.ip", Values: []string{"10.0.0.0/8"}})), false},
		{"methods", pol("a", ALLOW, toEcho, to(&op{Methods: []string{"GET"}})), true},
		{"notPaths", pol("a", DENY, toGateway, to(&op{NotPaths: []string{"/x"}})), true},
		{"hosts", pol("a", ALLOW, toClass, to(&op{Hosts: []string{"echo"}})), false}, // class policies live in the root namespace
		{"remoteIpBlocks", pol("a", ALLOW, toEcho, from(&src{RemoteIpBlocks: []string{"1.2.3.4"}})), true},
		{"header condition", pol("a", ALLOW, toEcho, when(&cond{Key: "request.headers[x-dev]", Values: []string{"a"}})), true},
		{"sni condition", pol("a", ALLOW, toEcho, when(&cond{Key: "connection.sni", Values: []string{"a"}})), true},
		{"another service's HTTP policy", pol("a", ALLOW, toOther, to(&op{Methods: []string{"GET"}})), false},
		{"CUSTOM rules with HTTP fields", pol("a", CUSTOM, toEcho, to(&op{Methods: []string{"GET"}})), true},
		{"dry-run policy with HTTP fields (its would-be outcome needs them)", dry(pol("a", DENY, toEcho, to(&op{Methods: []string{"GET"}}))), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := New(wp, []*Policy{c.p}).NeedsL7(echo); got != c.want {
				t.Fatalf("NeedsL7 = %v, want %v", got, c.want)
			}
		})
	}
}

// A policy that only grants privileges (STEAL, MIRROR) takes no part in traffic decisions: it
// neither allow-lists the Gateway's traffic nor forces inspection; a mixed one does both.
func TestPrivilegePoliciesLeaveTrafficAlone(t *testing.T) {
	grant := pol("devs", ALLOW, toGateway, &rule{
		From: []*secv1beta1.Rule_From{{Source: &src{Principals: []string{"cluster.local/ns/dev/sa/*"}}}},
		To:   []*secv1beta1.Rule_To{{Operation: &op{Methods: []string{"STEAL", "MIRROR"}}}},
	})
	e := New(wp, []*Policy{grant})
	if d := e.Decide(tcp()); !d.Allow {
		t.Fatalf("ordinary traffic denied by a privilege grant: %s", d)
	}
	if e.NeedsL7(Service{Namespace: "demo", Name: "echo"}) {
		t.Fatal("a privilege grant forced inspection")
	}
	mixed := pol("mixed", ALLOW, toGateway, to(&op{Methods: []string{"STEAL", "GET"}}))
	if d := New(wp, []*Policy{mixed}).Decide(tcp()); d.Allow {
		t.Fatalf("a mixed ALLOW policy must still allow-list traffic: %s", d)
	}
	r := tcp()
	r.Principal = "cluster.local/ns/dev/sa/alice"
	r.HTTP = &HTTPRequest{Method: "STEAL", Host: "echo.demo.svc.cluster.local", Path: "/ports/80"}
	if d := e.Grant(r); !d.Allow {
		t.Fatalf("grant: %s", d)
	}
}
