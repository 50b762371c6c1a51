package authz

import (
	"slices"
	"strings"
	"testing"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

func dry(p *Policy) *Policy { p.DryRun = true; return p }

func custom(name, provider string, rules ...*rule) *Policy {
	p := pol(name, CUSTOM, toEcho, rules...)
	p.Spec.ActionDetail = &secv1beta1.AuthorizationPolicy_Provider{Provider: &secv1beta1.AuthorizationPolicy_ExtensionProvider{Name: provider}}
	return p
}

// Dry-run policies (istio.io/dry-run: "true") are evaluated and reported, never enforced; a
// dry-run ALLOW does not make the service allow-listed.
func TestDryRun(t *testing.T) {
	for _, tc := range []struct {
		name     string
		policies []*Policy
		req      *Request
		want     string // Decision.String()
		dryRun   []string
	}{
		{"dry-run DENY matching: allowed, reported deny", []*Policy{dry(pol("d", DENY, toEcho, &rule{}))}, tcp(),
			"allow: no policy applies", []string{"demo/d: deny"}},
		{"dry-run DENY not matching: reported allow", []*Policy{dry(pol("d", DENY, toEcho, from(&src{Namespaces: []string{"prod"}})))}, tcp(),
			"allow: no policy applies", []string{"demo/d: allow"}},
		{"dry-run ALLOW not matching does not make the service default-deny", []*Policy{dry(pol("a", ALLOW, toEcho, from(&src{Namespaces: []string{"prod"}})))}, tcp(),
			"allow: no policy applies", []string{"demo/a: deny"}},
		{"dry-run ALLOW-all does not open an enforced ALLOW", []*Policy{dry(pol("all", ALLOW, toEcho, &rule{})), pol("prod", ALLOW, toEcho, from(&src{Namespaces: []string{"prod"}}))}, tcp(),
			"deny: no ALLOW policy matched (demo/prod)", []string{"demo/all: allow"}},
		{"enforced DENY still denies beside a dry-run one", []*Policy{dry(pol("d1", DENY, toEcho, &rule{})), pol("d2", DENY, toEcho, &rule{})}, tcp(),
			"deny: denied by DENY policy demo/d2", []string{"demo/d1: deny"}},
		{"dry-run CUSTOM without provider is not enforced", []*Policy{dry(custom("ext", "opa", &rule{}))}, tcp(),
			"allow: no policy applies", []string{"demo/ext: deny"}},
		{"dry-run policy of another service is not reported", []*Policy{dry(pol("o", DENY, toOther, &rule{}))}, tcp(),
			"allow: no policy applies", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := New(wp, tc.policies).Decide(tc.req)
			if d.String() != tc.want || !slices.Equal(d.DryRun, tc.dryRun) {
				t.Fatalf("got %q dry-run %q\nwant %q dry-run %q", d, d.DryRun, tc.want, tc.dryRun)
			}
		})
	}
}

func TestDryRunAnnotation(t *testing.T) {
	for _, tc := range []struct {
		ann  map[string]string
		want bool
	}{
		{nil, false},
		{map[string]string{"istio.io/dry-run": "true"}, true},
		{map[string]string{"istio.io/dry-run": "1"}, true},
		{map[string]string{"istio.io/dry-run": "false"}, false},
		{map[string]string{"istio.io/dry-run": "yes"}, false}, // istiod cannot parse it: enforced
	} {
		if got := DryRun(tc.ann); got != tc.want {
			t.Errorf("DryRun(%v) = %v, want %v", tc.ann, got, tc.want)
		}
	}
}

// CUSTOM without a provider denies exactly the requests its rules match (istiod turns the rules
// of a CUSTOM policy with an unknown provider into DENY rules), traffic and privileges alike.
func TestCustomWithoutProvider(t *testing.T) {
	const reason = `deny: denied by CUSTOM policy demo/ext: no usable ext_authz provider "opa" is configured, so its matching requests are denied (as istiod does for an unknown provider)`
	for _, tc := range []struct {
		name     string
		policies []*Policy
		req      *Request
		want     string
	}{
		{"matching rule: denied naming the provider", []*Policy{custom("ext", "opa", to(&op{Paths: []string{"/admin*"}}))}, httpReq("GET", "/admin/x"), reason},
		{"rule not matching: not affected", []*Policy{custom("ext", "opa", to(&op{Paths: []string{"/admin*"}}))}, httpReq("GET", "/public"), "allow: no policy applies"},
		{"rule not matching: the ALLOW decides", []*Policy{custom("ext", "opa", to(&op{Paths: []string{"/admin*"}})), pol("a", ALLOW, toEcho, from(&src{Namespaces: []string{"prod"}}))}, httpReq("GET", "/public"),
			"deny: no ALLOW policy matched (demo/a)"},
		{"no rules: matches nothing", []*Policy{custom("ext", "opa")}, tcp(), "allow: no policy applies"},
		{"HTTP-only rule on a TCP stream is ignored, as in a DENY: denied", []*Policy{custom("ext", "opa", to(&op{Methods: []string{"GET"}}))}, tcp(), reason},
		{"CUSTOM before ALLOW", []*Policy{custom("ext", "opa", &rule{}), pol("a", ALLOW, toEcho, &rule{})}, tcp(), reason},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if d := New(wp, tc.policies).Decide(tc.req); d.String() != tc.want {
				t.Fatalf("got  %q\nwant %q", d, tc.want)
			}
		})
	}
	steal := tcp()
	steal.HTTP = &HTTPRequest{Method: "STEAL", Host: "echo.demo.svc.cluster.local", Path: "/ports/80"}
	grant := pol("devs", ALLOW, toEcho, to(&op{Methods: []string{"STEAL"}}))
	if d := New(wp, []*Policy{custom("ext", "opa", to(&op{Paths: []string{"/admin*"}})), grant}).Grant(steal); !d.Allow {
		t.Fatalf("a CUSTOM policy that does not match refused a grant: %s", d)
	}
	if d := New(wp, []*Policy{custom("ext", "opa", &rule{}), grant}).Grant(steal); d.String() != reason {
		t.Fatalf("got %q", d)
	}
}

// A matching CUSTOM policy hands the decision to its provider: the Decision denies (so a caller
// that calls no provider fails closed) and carries the provider and the DENY/ALLOW decision that
// applies if it allows; a policy naming no provider, or two providers on one service, deny.
func TestCustomDecision(t *testing.T) {
	for _, tc := range []struct {
		name     string
		policies []*Policy
		req      *Request
		provider string // "" means Custom is nil
		then     string
		want     string
	}{
		{"matching: provider and the ALLOW's decision", []*Policy{custom("ext", "opa", &rule{}), pol("a", ALLOW, toEcho, from(&src{Namespaces: []string{"prod"}}))}, tcp(),
			"opa", "deny: no ALLOW policy matched (demo/a)", `deny: denied by CUSTOM policy demo/ext: no usable ext_authz provider "opa" is configured, so its matching requests are denied (as istiod does for an unknown provider)`},
		{"matching, DENY after it", []*Policy{custom("ext", "opa", &rule{}), pol("d", DENY, toEcho, &rule{})}, tcp(),
			"opa", "deny: denied by DENY policy demo/d", ""},
		{"matching, nothing else", []*Policy{custom("ext", "opa", &rule{})}, tcp(), "opa", "allow: no policy applies", ""},
		{"not matching: no call", []*Policy{custom("ext", "opa", to(&op{Paths: []string{"/admin*"}}))}, httpReq("GET", "/"), "", "", "allow: no policy applies"},
		{"no provider named", []*Policy{custom("ext", "", &rule{})}, tcp(), "", "",
			"deny: denied by CUSTOM policy demo/ext: it names no provider, so its matching requests are denied (as istiod does)"},
		{"two providers on one service", []*Policy{custom("a", "opa", &rule{}), dry(custom("b", "oauth", to(&op{Paths: []string{"/x"}})))}, tcp(), "", "",
			`deny: denied by CUSTOM policy demo/a: CUSTOM policies demo/a and demo/b name different providers ("opa", "oauth"), so their matching requests are denied (as istiod does without PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := New(wp, tc.policies).Decide(tc.req)
			if tc.want != "" && d.String() != tc.want {
				t.Fatalf("got  %q\nwant %q", d, tc.want)
			}
			if tc.provider == "" {
				if d.Custom != nil {
					t.Fatalf("Custom = %+v, want nil", d.Custom)
				}
				return
			}
			if d.Allow || d.Custom == nil || d.Custom.Provider != tc.provider || d.Custom.Policy != "demo/ext" || d.Custom.Then.String() != tc.then {
				t.Fatalf("got %s, Custom %+v; want a denial calling %q, then %q", d, d.Custom, tc.provider, tc.then)
			}
		})
	}
}

// The CUSTOM phase is matched as Envoy's waypoint matches it, before jwt_authn: the request's
// token takes no part (requestPrincipals and request.auth.* never match, notRequestPrincipals
// always does), while the phase after it (DecideLocal) sees the token; Decide combines both.
func TestCustomIgnoresToken(t *testing.T) {
	anyToken := from(&src{RequestPrincipals: []string{"*"}})
	noToken := from(&src{NotRequestPrincipals: []string{"*"}})
	claim := when(&cond{Key: "request.auth.claims[groups]", Values: []string{"dev"}})
	for _, tc := range []struct {
		name     string
		policies []*Policy
		asked    bool // DecideCustom hands the request to the provider
		local    string
	}{
		{"requestPrincipals never matches", []*Policy{custom("ext", "opa", anyToken)}, false, "allow: no policy applies"},
		{"request.auth.claims never matches", []*Policy{custom("ext", "opa", claim)}, false, "allow: no policy applies"},
		{"notRequestPrincipals always matches", []*Policy{custom("ext", "opa", noToken)}, true, "allow: no policy applies"},
		{"the ALLOW after it sees the token", []*Policy{custom("ext", "opa", noToken), pol("a", ALLOW, toEcho, anyToken)}, true, "allow: allowed by ALLOW policy demo/a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := New(wp, tc.policies)
			r := withJWT(httpReq("GET", "/"))
			c := e.DecideCustom(r)
			if asked := c.Custom != nil; asked != tc.asked || c.Allow == tc.asked {
				t.Fatalf("DecideCustom: %s, Custom %+v; want asked %v", c, c.Custom, tc.asked)
			}
			if r.HTTP.JWT == nil {
				t.Fatal("DecideCustom dropped the caller's token")
			}
			if d := e.DecideLocal(r); d.String() != tc.local {
				t.Fatalf("DecideLocal: %q, want %q", d, tc.local)
			}
			d := e.Decide(r)
			if tc.asked && (d.Custom == nil || d.Custom.Then.String() != tc.local) || !tc.asked && d.String() != tc.local {
				t.Fatalf("Decide: %s, Custom %+v", d, d.Custom)
			}
		})
	}
}

// Where a match differs from a plain reading of the fields, Envoy's (as istiod configures it) wins.
func TestEnvoyMatching(t *testing.T) {
	withHost := func(host string) *Request { r := httpReq("GET", "/"); r.HTTP.Host = host; return r }
	withHeader := func(vs ...string) *Request { r := httpReq("GET", "/"); r.HTTP.Header["X-Dev"] = vs; return r }
	se := []*typev1beta1.PolicyTargetReference{{Group: "networking.istio.io", Kind: "ServiceEntry", Name: "echo"}}
	for _, tc := range []struct {
		name     string
		policies []*Policy
		req      *Request
		want     string
	}{
		// serviceAccounts: `sa` alone names the policy's namespace.
		{"serviceAccounts short form in the policy's namespace", []*Policy{pol("a", ALLOW, toEcho, from(&src{ServiceAccounts: []string{"sleep"}}))},
			func() *Request { r := tcp(); r.Principal = "cluster.local/ns/demo/sa/sleep"; return r }(), "allow: allowed by ALLOW policy demo/a"},
		{"serviceAccounts short form, caller in another namespace", []*Policy{pol("a", ALLOW, toEcho, from(&src{ServiceAccounts: []string{"sleep"}}))},
			tcp(), "deny: no ALLOW policy matched (demo/a)"},
		{"notServiceAccounts short form", []*Policy{pol("d", DENY, toEcho, from(&src{NotServiceAccounts: []string{"sleep"}}))},
			func() *Request { r := tcp(); r.Principal = "cluster.local/ns/demo/sa/sleep"; return r }(), "allow: no policy applies"},
		{"serviceAccounts ns/sa form", []*Policy{pol("a", ALLOW, toEcho, from(&src{ServiceAccounts: []string{"default/sleep"}}))},
			tcp(), "allow: allowed by ALLOW policy demo/a"},
		// hosts: :authority as sent, port included, case folded.
		{"hosts without port do not match a Host with one", []*Policy{pol("a", ALLOW, toEcho, to(&op{Hosts: []string{"echo.demo.svc.cluster.local"}}))},
			withHost("echo.demo.svc.cluster.local:8080"), "deny: no ALLOW policy matched (demo/a)"},
		{"hosts with port:* match a Host with one", []*Policy{pol("a", ALLOW, toEcho, to(&op{Hosts: []string{"ECHO.demo.svc.cluster.local:*"}}))},
			withHost("echo.demo.svc.cluster.local:8080"), "allow: allowed by ALLOW policy demo/a"},
		{"hosts exact without port", []*Policy{pol("a", ALLOW, toEcho, to(&op{Hosts: []string{"Echo.demo.svc.cluster.local"}}))},
			withHost("echo.demo.svc.cluster.local"), "allow: allowed by ALLOW policy demo/a"},
		{"notHosts without port do not exclude a Host with one", []*Policy{pol("d", DENY, toEcho, to(&op{NotHosts: []string{"echo.demo.svc.cluster.local"}}))},
			withHost("echo.demo.svc.cluster.local:80"), "deny: denied by DENY policy demo/d"},
		// Repeated headers are matched joined with ",".
		{"repeated header joined: exact value no longer matches", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.headers[x-dev]", Values: []string{"alice"}}))},
			withHeader("alice", "bob"), "deny: no ALLOW policy matched (demo/a)"},
		{"repeated header joined: the joined value matches", []*Policy{pol("a", ALLOW, toEcho, when(&cond{Key: "request.headers[x-dev]", Values: []string{"alice,bob"}}))},
			withHeader("alice", "bob"), "allow: allowed by ALLOW policy demo/a"},
		{"repeated header joined: suffix", []*Policy{pol("d", DENY, toEcho, when(&cond{Key: "request.headers[x-dev]", Values: []string{"*,bob"}}))},
			withHeader("alice", "bob"), "deny: denied by DENY policy demo/d"},
		{"absent header never matches a value", []*Policy{pol("d", DENY, toEcho, when(&cond{Key: "request.headers[x-none]", Values: []string{"*"}}))},
			withHeader("alice"), "allow: no policy applies"},
		// targetRefs wins over the legacy targetRef.
		{"legacy targetRef ignored when targetRefs is set", []*Policy{{Namespace: "demo", Name: "both", Spec: &secv1beta1.AuthorizationPolicy{Action: DENY, TargetRef: toEcho[0], TargetRefs: toOther, Rules: []*rule{{}}}}},
			tcp(), "allow: no policy applies"},
		// A ServiceEntry target is not the Service of the same name.
		{"ServiceEntry targetRef does not apply to the Service echo", []*Policy{pol("se", DENY, se, &rule{})}, tcp(), "allow: no policy applies"},
		// remote.ip from X-Forwarded-For.
		{"remoteIpBlocks from X-Forwarded-For", []*Policy{pol("d", DENY, toEcho, from(&src{RemoteIpBlocks: []string{"203.0.113.0/24"}}))},
			func() *Request {
				r := httpReq("GET", "/")
				r.RemoteIP = RemoteIP([]string{"203.0.113.7, 10.0.0.1"}, 1)
				return r
			}(), "deny: denied by DENY policy demo/d"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if d := New(wp, tc.policies).Decide(tc.req); d.String() != tc.want {
				t.Fatalf("got  %q\nwant %q", d, tc.want)
			}
		})
	}
}

func TestRemoteIP(t *testing.T) {
	for _, tc := range []struct {
		xff  []string
		n    int
		want string // "" for the zero Addr (the source IP)
	}{
		{nil, 0, ""},
		{[]string{"203.0.113.7"}, 0, "203.0.113.7"},
		{[]string{"203.0.113.7, 10.0.0.1"}, 0, "10.0.0.1"},
		{[]string{"203.0.113.7, 10.0.0.1"}, 1, "203.0.113.7"},
		{[]string{"203.0.113.7", "10.0.0.1,10.0.0.2"}, 2, "203.0.113.7"}, // repeated headers joined
		{[]string{"203.0.113.7, 10.0.0.1"}, 2, ""},                       // fewer entries than trusted proxies
		{[]string{"not-an-ip"}, 0, ""},
		{[]string{"::ffff:10.0.0.9"}, 0, "10.0.0.9"},
	} {
		got := RemoteIP(tc.xff, tc.n)
		if s := got.String(); (tc.want == "" && got.IsValid()) || (tc.want != "" && s != tc.want) {
			t.Errorf("RemoteIP(%q, %d) = %s, want %q", tc.xff, tc.n, got, tc.want)
		}
	}
}

// Istio's TestAuthz_PathTemplating (tests/integration/security/authz_test.go), every case, on the
// templates of its testdata/authz/path-templating.yaml.tmpl; before, {**} matched only as the last
// segment and required one.
func TestPathTemplates(t *testing.T) {
	for _, tc := range []struct {
		template, path string
		match          bool
	}{
		{"/allow/admin/{**}", "/allow/admin/", true},
		{"/allow/admin/{**}", "/allow/admin", false},
		{"/allow/admin/{**}", "/allow/user/", false},
		{"/allow/admin/{**}", "/allow", false},
		{"/allow/admin/{**}", "/allow/admin/temp", true},
		{"/allow/admin/{**}", "/allow/admin/temp.txt", true},
		{"/allow/admin/{**}", "/allow/admin/foo/temp.txt", true},
		{"/foo/{*}/bar/{**}", "/foo/buzz/bar/bat.txt", true},
		{"/foo/{*}/bar/{**}", "/foo/buzz/bar/bat.temp.txt", true},
		{"/foo/{*}/bar/{**}", "/foo/buzz/bar/bat/fuzz.txt", true},
		{"/foo/{*}/bar/{**}", "/foo/bar/bat.txt", false},
		{"/foo/{*}/bar/{**}", "/foo//bar/bat.txt", false},
		{"/foo/{*}/bar/{**}", "/foo/buzz/bar/bat", true},
		{"/store/{**}/cart", "/store//cart", true},
		{"/store/{**}/cart", "/store/cart", false},
		{"/store/{**}/cart", "/store/foo/cart", true},
		{"/store/{**}/cart", "/store/foo/bar/cart", true},
		{"/users/{*}/profile", "/users/a b/profile", false}, // a space is no path character
		// A client's path against several operators: a backtracking matcher takes about n^4 steps
		// here (it never finished); the sweep takes n per operator.
		{"/{**}/{**}/{**}/{**}/x", strings.Repeat("/", 8192), false},
		{"/{**}/{**}/{**}/{**}/x", strings.Repeat("/", 8192) + "x", true},
	} {
		if got := matchPath(tc.template, tc.path); got != tc.match {
			t.Errorf("%s on %s: %v, want %v", tc.template, tc.path, got, tc.match)
		}
	}
}

// source.trustDomain, a condition key of Istio's (pilot/pkg/security/authz/model/model.go), was
// an unknown key: an ALLOW on it never matched.
func TestSourceTrustDomain(t *testing.T) {
	req := tcp()
	for _, tc := range []struct {
		cond  *secv1beta1.Condition
		allow bool
	}{
		{&secv1beta1.Condition{Key: "source.trustDomain", Values: []string{"cluster.local"}}, true},
		{&secv1beta1.Condition{Key: "source.trustDomain", Values: []string{"other.org"}}, false},
		{&secv1beta1.Condition{Key: "source.trustDomain", NotValues: []string{"bad.example.com"}}, true},
	} {
		e := New(wp, []*Policy{pol("a", ALLOW, toEcho, &rule{When: []*secv1beta1.Condition{tc.cond}})})
		if d := e.Decide(req); d.Allow != tc.allow {
			t.Errorf("%v: %s, want allow=%v", tc.cond, d, tc.allow)
		}
	}
}
