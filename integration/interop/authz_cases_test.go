package interop

import "strings"

// Sources of the authorization scenarios: the identities Istio's authz tests call Allowed and
// Denied (tests/integration/security/authz_test.go), each in a namespace of its own name.
const (
	allowedID = "spiffe://cluster.local/ns/allowed/sa/a"
	deniedID  = "spiffe://cluster.local/ns/denied/sa/d"
	// Istio's `istio-testing` suite, file by file.
	authzTests = "tests/integration/security/authz_test.go "
)

// policy is an AuthorizationPolicy on Service web (the waypoint form: targetRefs where Istio's
// sidecar tests write a selector); body is its spec after targetRefs, indented two spaces.
func policy(name, body string) string {
	return "kind: AuthorizationPolicy\nmetadata: {name: " + name + "}\nspec:\n" + toWeb + body
}

func docs(objs ...string) string { return strings.Join(objs, "\n---\n") }

// authzScenarios are Istio's authorization integration tests and task docs, each policy as its
// testdata writes it but bound by targetRefs. At a waypoint `ports` are web's service ports (the
// CONNECT authority, which Envoy's waypoint restores as the connection's local address): 80
// declared HTTP, 81 undeclared (sniffed), 82 declared TCP.
func authzScenarios() []jwtScenario {
	get := func(name, path, from string, code int) jwtCase {
		c := jwtCase{name: name, path: path, from: from, code: code}
		if code == 403 {
			c.body = rbacDenied
		}
		return c
	}
	method := func(name, m, path, from string, code int) jwtCase {
		c := get(name, path, from, code)
		c.method = m
		if m == "HEAD" {
			c.body = "" // a HEAD answer has none
		}
		return c
	}
	tcp := func(name, from string, code int) jwtCase {
		return jwtCase{name: name, from: from, tcp: true, code: code}
	}
	hdr := func(c jwtCase, kv ...string) jwtCase { c.header = kv; return c }
	host := func(c jwtCase, h string) jwtCase { c.host = h; return c }
	port := func(c jwtCase, p int) jwtCase { c.port = p; return c }

	principalRules := func(field, allowed string) string {
		return `  action: ALLOW
  rules:
  - to: [{operation: {ports: ["80", "81"], paths: ["/allow"], methods: ["GET"]}}]
    from: [{source: {` + field + `: ["` + allowed + `"]}}]
  - to: [{operation: {ports: ["82"]}}]
    from: [{source: {` + field + `: ["` + allowed + `"]}}]
`
	}
	allowCases := []jwtCase{
		get("allowed GET /allow", "/allow", allowedID, 200),
		port(get("allowed GET /allow on the undeclared port", "/allow", allowedID, 200), 81),
		method("allowed POST /allow", "POST", "/allow", allowedID, 403),
		get("allowed GET /deny", "/deny", allowedID, 403),
		get("denied GET /allow", "/allow", deniedID, 403),
		port(get("denied GET /allow on the undeclared port", "/allow", deniedID, 403), 81),
		tcp("allowed TCP", allowedID, 200),
		tcp("denied TCP", deniedID, 403),
	}
	denyRules := func(field, denied string) string {
		return `  action: DENY
  rules:
  - to: [{operation: {ports: ["80", "81"], paths: ["/deny*"], notPaths: ["/deny/allow"], methods: ["GET"]}}]
    from: [{source: {` + field + `: ["` + denied + `"]}}]
  - to: [{operation: {ports: ["82"]}}]
    from: [{source: {` + field + `: ["` + denied + `"]}}]
`
	}
	denyCases := []jwtCase{
		get("denied GET /deny", "/deny", deniedID, 403),
		get("denied GET /deny/x", "/deny/x", deniedID, 403),
		get("denied GET /deny/allow (notPaths)", "/deny/allow", deniedID, 200),
		method("denied POST /deny (methods)", "POST", "/deny", deniedID, 200),
		get("denied GET /allow", "/allow", deniedID, 200),
		get("allowed GET /deny", "/deny", allowedID, 200),
		tcp("denied TCP", deniedID, 403),
		tcp("allowed TCP", allowedID, 200),
	}

	var templateCases []jwtCase
	for _, c := range []struct {
		path  string
		allow bool
	}{
		{"/allow/admin/", true}, {"/allow/admin", false}, {"/allow/user/", false}, {"/allow/admin?param=value", false},
		{"/allow", false}, {"/allow/admin/temp", true}, {"/allow/admin/temp.txt", true}, {"/allow/admin/foo/temp.txt", true},
		{"/foo/buzz/bar/bat.txt", true}, {"/foo/buzz/bar/bat.temp.txt", true}, {"/foo/buzz/bar/bat/fuzz.txt", true},
		{"/foo/bar/bat.txt", false}, {"/foo//bar/bat.txt", false}, {"/foo/buzz/bar/bat", true},
		{"/store//cart", true}, {"/store/cart", false}, {"/store/foo/cart", true}, {"/store/foo/bar/cart", true},
	} {
		templateCases = append(templateCases, get(c.path, c.path, "", map[bool]int{true: 200, false: 403}[c.allow]))
	}

	return []jwtScenario{
		{source: authzTests + "TestAuthz_Principal (testdata/authz/allow-principal.yaml.tmpl)",
			objects: policy("allow-principal", principalRules("principals", "cluster.local/ns/allowed/sa/a")), cases: allowCases},
		{source: authzTests + "TestAuthz_ServiceAccount (testdata/authz/allow-serviceaccount.yaml.tmpl)",
			objects: policy("allow-sa", principalRules("serviceAccounts", "allowed/a")), cases: allowCases},
		{source: authzTests + "TestAuthz_Namespace (testdata/authz/allow-namespace.yaml.tmpl)",
			objects: policy("allow-ns", principalRules("namespaces", "allowed")), cases: allowCases},
		{source: authzTests + "TestAuthz_DenyPrincipal (testdata/authz/deny-principal.yaml.tmpl)",
			objects: policy("deny-principal", denyRules("principals", "cluster.local/ns/denied/sa/d")), cases: denyCases},
		{source: authzTests + "TestAuthz_DenyNamespace (testdata/authz/deny-namespace.yaml.tmpl)",
			objects: policy("deny-ns", denyRules("namespaces", "denied")), cases: denyCases},
		{source: authzTests + "TestAuthz_NotNamespace (testdata/authz/not-namespace.yaml.tmpl)",
			objects: policy("not-ns", `  action: DENY
  rules:
  - from: [{source: {notNamespaces: ["allowed"]}}]
`),
			cases: []jwtCase{get("allowed", "/", allowedID, 200), get("denied", "/", deniedID, 403),
				tcp("allowed TCP", allowedID, 200), tcp("denied TCP", deniedID, 403)}},
		{source: authzTests + "TestAuthz_NotHost (testdata/authz/not-host.yaml.tmpl)",
			objects: policy("not-host", `  action: ALLOW
  rules:
  - to: [{operation: {notHosts: ["deny.web.com"]}}]
`),
			cases: []jwtCase{host(get("allow.web.com", "/", "", 200), "allow.web.com"), host(get("deny.web.com", "/", "", 403), "deny.web.com"),
				// Envoy's hosts match compares the :authority as sent, port included.
				host(get("deny.web.com:80, port as sent", "/", "", 200), "deny.web.com:80")}},
		{source: authzTests + "TestAuthz_NotMethod (testdata/authz/not-method.yaml.tmpl)",
			objects: policy("not-method", `  action: ALLOW
  rules:
  - to: [{operation: {notMethods: ["PUT"]}}]
`),
			cases: []jwtCase{get("GET", "/", "", 200), method("PUT", "PUT", "/", "", 403), method("POST", "POST", "/", "", 200),
				// HTTP-only fields never match a TCP stream: an ALLOW of them allows no TCP.
				tcp("TCP (notMethods is HTTP only)", "", 403)}},
		{source: authzTests + "TestAuthz_NotPort (testdata/authz/not-port.yaml.tmpl)",
			objects: policy("not-port", `  action: ALLOW
  rules:
  - to: [{operation: {notPorts: ["81"]}}]
`),
			cases: []jwtCase{get("port 80", "/", "", 200), port(get("port 81", "/", "", 403), 81), tcp("port 82", "", 200)}},
		{source: authzTests + "TestAuthz_PathPrecedence (testdata/authz/path-precedence.yaml.tmpl)",
			objects: docs(policy("deny-admin", `  action: DENY
  rules:
  - to: [{operation: {paths: ["/allow/admin"]}}]
`), policy("allow-prefix", `  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/allow*"]}}]
`)),
			cases: []jwtCase{get("/allow", "/allow", "", 200), get("/allow/admin", "/allow/admin", "", 403),
				get("/allow/x", "/allow/x", "", 200), get("/allowed", "/allowed", "", 200), get("/other", "/other", "", 403)}},
		{source: authzTests + "TestAuthz_PathTemplating (testdata/authz/path-templating.yaml.tmpl)",
			objects: policy("templates", `  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/allow/admin/{**}", "/foo/{*}/bar/{**}", "/store/{**}/cart"]}}]
`),
			cases: templateCases}, // Istio's own cases of that test, every one
		{source: authzTests + "TestAuthz_Conditions (testdata/authz/conditions.yaml.tmpl)",
			objects: policy("conditions", `  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/request-headers"]}}]
    when: [{key: "request.headers[x-foo]", values: ["foo"]}]
  - to: [{operation: {paths: ["/request-headers-notValues"]}}]
    when: [{key: "request.headers[x-foo]", notValues: ["bar"]}]
  - to: [{operation: {paths: ["/source-ip"]}}]
    when: [{key: "source.ip", values: ["127.0.0.1"]}]
  - to: [{operation: {paths: ["/source-ip-notValues"]}}]
    when: [{key: "source.ip", notValues: ["127.0.0.1"]}]
  - to: [{operation: {paths: ["/source-namespace"]}}]
    when: [{key: "source.namespace", values: ["allowed"]}]
  - to: [{operation: {paths: ["/source-namespace-notValues"]}}]
    when: [{key: "source.namespace", notValues: ["denied"]}]
  - to: [{operation: {paths: ["/source-principal"]}}]
    when: [{key: "source.principal", values: ["cluster.local/ns/allowed/sa/a"]}]
  - to: [{operation: {paths: ["/source-principal-notValues"]}}]
    when: [{key: "source.principal", notValues: ["cluster.local/ns/denied/sa/d"]}]
  - to: [{operation: {paths: ["/source-trust-domain"]}}]
    when: [{key: "source.trustDomain", values: ["cluster.local"]}]
  - to: [{operation: {paths: ["/source-trust-domain-notValues"]}}]
    when: [{key: "source.trustDomain", notValues: ["bad.example.com"]}]
  - to: [{operation: {paths: ["/destination-port"]}}]
    when: [{key: "destination.port", values: ["80"]}]
  - to: [{operation: {paths: ["/destination-ip"]}}]
    when: [{key: "destination.ip", values: ["10.96.0.0/16"]}]
`),
			cases: []jwtCase{
				hdr(get("request-headers x-foo: foo", "/request-headers", "", 200), "x-foo", "foo"),
				hdr(get("request-headers x-foo: bar", "/request-headers", "", 403), "x-foo", "bar"),
				get("request-headers without x-foo", "/request-headers", "", 403),
				hdr(get("request-headers-notValues x-foo: foo", "/request-headers-notValues", "", 200), "x-foo", "foo"),
				hdr(get("request-headers-notValues x-foo: bar", "/request-headers-notValues", "", 403), "x-foo", "bar"),
				get("source-ip", "/source-ip", "", 200),
				get("source-ip-notValues", "/source-ip-notValues", "", 403),
				get("source-namespace allowed", "/source-namespace", allowedID, 200),
				get("source-namespace denied", "/source-namespace", deniedID, 403),
				get("source-namespace-notValues allowed", "/source-namespace-notValues", allowedID, 200),
				get("source-namespace-notValues denied", "/source-namespace-notValues", deniedID, 403),
				get("source-principal allowed", "/source-principal", allowedID, 200),
				get("source-principal denied", "/source-principal", deniedID, 403),
				get("source-principal-notValues allowed", "/source-principal-notValues", allowedID, 200),
				get("source-principal-notValues denied", "/source-principal-notValues", deniedID, 403),
				get("source-trust-domain", "/source-trust-domain", "", 200),
				get("source-trust-domain-notValues", "/source-trust-domain-notValues", "", 200),
				get("destination-port 80", "/destination-port", "", 200),
				port(get("destination-port on 81", "/destination-port", "", 403), 81),
				get("destination-ip", "/destination-ip", "", 200),
			}},
		{source: "istio.io docs tasks/security/authorization/authz-http (allow-nothing, then an ALLOW of GET)",
			objects: policy("allow-nothing", ""),
			cases: []jwtCase{get("GET", "/", "", 403), method("POST", "POST", "/", "", 403), port(get("GET on the undeclared port", "/", "", 403), 81),
				tcp("TCP", "", 403)}},
		{source: "istio.io docs tasks/security/authorization/authz-http (viewer: ALLOW methods GET)",
			objects: policy("viewer", `  action: ALLOW
  rules:
  - to: [{operation: {methods: ["GET"]}}]
`),
			cases: []jwtCase{get("GET", "/", "", 200), method("HEAD", "HEAD", "/", "", 403), method("POST", "POST", "/", "", 403),
				port(get("GET on the undeclared port", "/", "", 200), 81), tcp("TCP (methods is HTTP only)", "", 403)}},
		{source: "istio.io docs tasks/security/authorization/authz-deny (deny-method-get with x-token notValues admin, allow-path-ip)",
			objects: docs(policy("deny-method-get", `  action: DENY
  rules:
  - to: [{operation: {methods: ["GET"]}}]
    when: [{key: "request.headers[x-token]", notValues: ["admin"]}]
`), policy("allow-path-ip", `  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/ip"]}}]
`)),
			cases: []jwtCase{
				get("GET /ip without x-token", "/ip", "", 403),
				hdr(get("GET /ip x-token: admin", "/ip", "", 200), "x-token", "admin"),
				hdr(get("GET /ip x-token: guest", "/ip", "", 403), "x-token", "guest"),
				hdr(get("GET /headers x-token: admin (no ALLOW)", "/headers", "", 403), "x-token", "admin"),
				method("POST /ip", "POST", "/ip", "", 200),
			}},
		{source: "istio.io docs tasks/security/authorization/authz-tcp (ALLOW ports, then DENY methods on a TCP port)",
			objects: policy("tcp-policy", `  action: ALLOW
  rules:
  - to: [{operation: {ports: ["82"]}}]
`),
			cases: []jwtCase{tcp("TCP 82 allowed", "", 200), get("HTTP 80 not in the ALLOW", "/", "", 403)}},
		{source: "istio.io docs tasks/security/authorization/authz-tcp (DENY with the HTTP-only methods on port 82 denies all of 82)",
			objects: policy("tcp-deny", `  action: DENY
  rules:
  - to: [{operation: {methods: ["GET"], ports: ["82"]}}]
`),
			cases: []jwtCase{tcp("TCP 82 denied", "", 403), get("HTTP 80 untouched", "/", "", 200)}},
		{source: "istio.io docs tasks/security/authorization/authz-dry-run (istio.io/dry-run on a DENY)",
			objects: "kind: AuthorizationPolicy\nmetadata: {name: deny-path-headers, annotations: {\"istio.io/dry-run\": \"true\"}}\nspec:\n" + toWeb + `  action: DENY
  rules:
  - to: [{operation: {paths: ["/headers"]}}]
`,
			cases: []jwtCase{get("/headers (shadow DENY, not enforced)", "/headers", "", 200), get("/ip", "/ip", "", 200)}},
		{source: "pilot/pkg/security/authz/builder/testdata/http/dry-run-allow-in.yaml (a dry-run ALLOW is not an ALLOW that applies)",
			objects: "kind: AuthorizationPolicy\nmetadata: {name: dry-allow, annotations: {\"istio.io/dry-run\": \"true\"}}\nspec:\n" + toWeb + `  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/nothing"]}}]
`,
			cases: []jwtCase{get("/ (no enforced ALLOW applies)", "/", "", 200), tcp("TCP", "", 200)}},
		{source: "pilot/pkg/security/authz/builder/testdata/http/deny-and-allow-in.yaml (DENY before ALLOW)",
			objects: docs(policy("deny", `  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/denied/sa/d"]}}]
`), policy("allow", `  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/allowed/sa/a", "cluster.local/ns/denied/sa/d"]}}]
`)),
			cases: []jwtCase{get("allowed", "/", allowedID, 200), get("denied (in both)", "/", deniedID, 403),
				get("neither", "/", "", 403), tcp("denied TCP", deniedID, 403), tcp("allowed TCP", allowedID, 200)}},
		{source: "pilot/pkg/security/authz/builder/testdata/http/custom-bad-out.yaml (CUSTOM with no such provider denies its matches only)",
			objects: policy("ext", `  action: CUSTOM
  provider: {name: nowhere}
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
`),
			cases: []jwtCase{get("/admin", "/admin", "", 403), get("/public", "/public", "", 200)}},
		{source: "pilot/pkg/security/authz/builder/testdata/http/audit-full-rule-in.yaml (AUDIT never decides)",
			objects: policy("audit", `  action: AUDIT
  rules:
  - to: [{operation: {paths: ["/audited"]}}]
`),
			cases: []jwtCase{get("/audited", "/audited", "", 200), tcp("TCP", "", 200)}},
		// Istio's waypoint terminates HBONE with use_remote_address false and no trusted hops
		// (pilot/pkg/networking/core/listener_waypoint.go): Envoy takes the rightmost entry.
		{source: "istio.io docs reference/config/security/authorization-policy (remoteIpBlocks from X-Forwarded-For at a waypoint)",
			objects: policy("remote", `  action: ALLOW
  rules:
  - from: [{source: {remoteIpBlocks: ["203.0.113.0/24"]}}]
`),
			cases: []jwtCase{
				hdr(get("XFF 203.0.113.7", "/", "", 200), "X-Forwarded-For", "203.0.113.7"),
				hdr(get("XFF 198.51.100.1", "/", "", 403), "X-Forwarded-For", "198.51.100.1"),
				hdr(get("XFF spoofed first entry", "/", "", 403), "X-Forwarded-For", "203.0.113.7, 198.51.100.1"),
				hdr(get("XFF last entry", "/", "", 200), "X-Forwarded-For", "198.51.100.1, 203.0.113.7"),
				get("no XFF (the peer, 127.0.0.1)", "/", "", 403),
			}},
	}
}
