package interop

import (
	"strings"

	"istio.io/istio/tests/common/jwt"

	"github.com/detour-mesh/detour/proxy/authn"
)

// jwtScenarios are Istio's RequestAuthentication and JWT authorization tests and docs, each
// object as Istio's testdata writes it but bound by targetRefs (the waypoint form).
func jwtScenarios(demo, groupsScope string) []jwtScenario {
	ok := func(name string, hdr ...string) jwtCase { return jwtCase{name: name, header: hdr, code: 200} }
	allow := func(path, tok string, yes bool) jwtCase {
		c := jwtCase{name: path + "/" + tokenName(tok), path: path, code: 403, body: rbacDenied}
		if tok != "" {
			c.header = bearer(tok)
		}
		if yes {
			c.code, c.body = 200, ""
		}
		return c
	}
	const ra1and2 = `kind: RequestAuthentication
metadata: {name: authn-only}
spec:
` + toWeb + `  jwtRules:
  - issuer: "test-issuer-1@istio.io"
    jwksUri: "{{JWKS}}/jwks"
    outputPayloadToHeader: "x-test-payload"
    outputClaimToHeaders:
    - {header: "x-jwt-iss", claim: "iss"}
    - {header: "x-jwt-iat", claim: "iat"}
    - {header: "x-jwt-nested-claim", claim: "nested.nested-2.key2"}
  - issuer: "test-issuer-2@istio.io"
    jwksUri: "{{JWKS}}/jwks"
    outputPayloadToHeader: "x-test-payload"
`
	const ra1 = `kind: RequestAuthentication
metadata: {name: authn}
spec:
` + toWeb + `  jwtRules:
  - issuer: "test-issuer-1@istio.io"
    jwksUri: "{{JWKS}}/jwks"
`
	const requireSub1 = `
---
kind: AuthorizationPolicy
metadata: {name: authz}
spec:
` + toWeb + `  rules:
  - to: [{operation: {methods: ["GET"]}}]
    from: [{source: {requestPrincipals: ["test-issuer-1@istio.io/sub-1"]}}]
`
	const sampleRA = `kind: RequestAuthentication
metadata: {name: jwt-example}
spec:
` + toWeb + `  jwtRules:
  - issuer: "testing@secure.istio.io"
    jwksUri: "{{JWKS}}/samples"
`
	const requireDemo = `
---
kind: AuthorizationPolicy
metadata: {name: require-jwt}
spec:
` + toWeb + `  action: ALLOW
  rules:
  - from: [{source: {requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]}}]
`
	expired := jwtCase{name: "expired-token", header: bearer(jwt.TokenExpired), code: 401, body: authn.StatusExpired}
	return []jwtScenario{
		{source: "tests/integration/security/jwt_test.go TestRequestAuthentication authn-only (testdata/requestauthn/authn-only.yaml.tmpl)",
			objects: ra1and2,
			cases: []jwtCase{
				{name: "valid-token-noauthz", header: bearer(jwt.TokenIssuer1), code: 200, seen: map[string]string{
					"Authorization": "", "X-Test-Payload": payload(jwt.TokenIssuer1), "X-Jwt-Iss": "test-issuer-1@istio.io", "X-Jwt-Iat": "1562182722"}},
				{name: "valid-token-2-noauthz", header: bearer(jwt.TokenIssuer2), code: 200, seen: map[string]string{
					"Authorization": "", "X-Test-Payload": payload(jwt.TokenIssuer2)}},
				{name: "expired-token-noauthz", header: bearer(jwt.TokenExpired), code: 401, body: authn.StatusExpired},
				{name: "expired-token-cors-preflight-request-allowed", method: "OPTIONS", code: 200,
					header: append(bearer(jwt.TokenExpired), "Access-Control-Request-Method", "POST", "Origin", "https://istio.io")},
				{name: "expired-token-bad-cors-preflight-request-rejected", method: "OPTIONS", code: 401, body: authn.StatusExpired,
					header: append(bearer(jwt.TokenExpired), "Access-Control-Request-Method", "POST")},
				ok("no-token-noauthz"),
				{name: "valid-nested-claim-token", header: bearer(jwt.TokenIssuer1WithNestedClaims2), code: 200, seen: map[string]string{
					"Authorization": "", "X-Test-Payload": payload(jwt.TokenIssuer1WithNestedClaims2), "X-Jwt-Iss": "test-issuer-1@istio.io",
					"X-Jwt-Iat": "1604008018", "X-Jwt-Nested-Claim": "valueC"}},
				// Envoy's jwt_authn drops a client's own payload header (sanitizePayloadHeaders).
				{name: "forged-payload-header-dropped", header: []string{"X-Test-Payload", "forged", "X-Jwt-Iss", "forged"}, code: 200,
					seen: map[string]string{"X-Test-Payload": "", "X-Jwt-Iss": ""}},
				{name: "unknown-issuer (TokenIssuer3)", header: bearer(jwt.TokenIssuer3), code: 401, body: authn.StatusUnknownIssuer},
				{name: "invalid-token (TokenInvalid)", header: bearer(jwt.TokenInvalid), code: 401, body: authn.StatusBadFormat},
			}},
		{source: "tests/integration/security/jwt_test.go TestRequestAuthentication authn-authz (testdata/requestauthn/authn-authz.yaml.tmpl)",
			objects: ra1 + requireSub1,
			cases: []jwtCase{
				{name: "valid-token", header: bearer(jwt.TokenIssuer1), code: 200, seen: map[string]string{"Authorization": ""}},
				expired,
				{name: "no-token", code: 403, body: rbacDenied},
				{name: "sub-2 token", header: bearer(jwt.TokenIssuer2), code: 401, body: authn.StatusUnknownIssuer},
			}},
		{source: "tests/integration/security/jwt_test.go TestRequestAuthentication no-authn-authz",
			cases: []jwtCase{ok("no-authn-authz"), ok("a token nobody validates passes as it is", bearer("deadbeef")...)}},
		{source: "tests/integration/security/jwt_test.go TestRequestAuthentication forward (testdata/requestauthn/forward.yaml.tmpl)",
			objects: strings.Replace(ra1, `    jwksUri: "{{JWKS}}/jwks"`, `    jwksUri: "{{JWKS}}/jwks"
    outputPayloadToHeader: "x-test-payload"
    forwardOriginalToken: true`, 1),
			cases: []jwtCase{{name: "valid-token-forward", header: bearer(jwt.TokenIssuer1), code: 200, seen: map[string]string{
				"Authorization": "Bearer " + jwt.TokenIssuer1, "X-Test-Payload": payload(jwt.TokenIssuer1)}}}},
		{source: "tests/integration/security/jwt_test.go TestRequestAuthentication aud (testdata/requestauthn/aud.yaml.tmpl)",
			objects: `kind: RequestAuthentication
metadata: {name: aud}
spec:
` + toWeb + `  jwtRules:
  - {issuer: "test-issuer-1@istio.io", jwksUri: "{{JWKS}}/jwks", audiences: ["foo"]}
  - {issuer: "test-issuer-2@istio.io", jwksUri: "{{JWKS}}/jwks", audiences: ["bar"]}
---
kind: RequestAuthentication
metadata: {name: aud-2}
spec:
` + toWeb + `  jwtRules:
  - {issuer: "test-issuer-2@istio.io", jwksUri: "{{JWKS}}/jwks"}
`,
			cases: []jwtCase{
				{name: "invalid-aud", header: bearer(jwt.TokenIssuer1), code: 403, body: authn.StatusAudience},
				ok("valid-aud", bearer(jwt.TokenIssuer1WithAud)...),
				ok("verify-policies-are-combined", bearer(jwt.TokenIssuer2)...),
			}},
		{source: "tests/integration/security/jwt_test.go TestRequestAuthentication invalid-jwks (testdata/requestauthn/invalid-jwks.yaml.tmpl)",
			objects: strings.Replace(ra1, "{{JWKS}}/jwks", "{{JWKS}}/jwks-not-exist.json", 1),
			cases: []jwtCase{
				{name: "invalid-jwks-valid-token-noauthz", header: bearer(jwt.TokenIssuer1), code: 401, body: authn.StatusVerificationFail},
				{name: "invalid-jwks-expired-token-noauthz", header: bearer(jwt.TokenExpired), code: 401, body: authn.StatusExpired},
				ok("invalid-jwks-no-token-noauthz"),
			}},
		{source: "tests/integration/security/jwt_test.go TestRequestAuthentication headers-params (testdata/requestauthn/headers-params.yaml.tmpl)",
			objects: `kind: RequestAuthentication
metadata: {name: headers-params}
spec:
` + toWeb + `  jwtRules:
  - issuer: "test-issuer-1@istio.io"
    jwksUri: "{{JWKS}}/jwks"
    fromHeaders:
    - {name: "x-jwt-token", prefix: "Value "}
    - {name: "auth-token", prefix: "Token "}
    fromParams: ["token", "secondary_token"]
` + requireSub1,
			cases: []jwtCase{
				{name: "valid-params", path: "/valid-token?token=" + jwt.TokenIssuer1, code: 200},
				{name: "valid-params-secondary", path: "/valid-token?secondary_token=" + jwt.TokenIssuer1, code: 200},
				{name: "invalid-params", path: "/valid-token?token_value=" + jwt.TokenIssuer1, code: 403, body: rbacDenied},
				{name: "valid-token-set", path: "/valid-token?token=" + jwt.TokenIssuer1 + "&secondary_token=" + jwt.TokenIssuer1, code: 200},
				{name: "invalid-token-set", path: "/valid-token?token=" + jwt.TokenIssuer1 + "&secondary_token=" + jwt.TokenExpired, code: 401, body: authn.StatusExpired},
				{name: "valid-header", header: []string{"X-Jwt-Token", "Value " + jwt.TokenIssuer1}, code: 200, seen: map[string]string{"X-Jwt-Token": ""}},
				{name: "valid-header-secondary", header: []string{"Auth-Token", "Token " + jwt.TokenIssuer1}, code: 200, seen: map[string]string{"Auth-Token": ""}},
				{name: "invalid-header", header: []string{"Auth-Header-Param", "Bearer " + jwt.TokenIssuer1}, code: 403, body: rbacDenied},
				{name: "Authorization is not a location here", header: bearer(jwt.TokenIssuer1), code: 403, body: rbacDenied},
			}},
		{source: "tests/integration/security/authz_test.go TestAuthz_JWT (testdata/authz/jwt.yaml.tmpl)",
			objects: authzJWT,
			cases: []jwtCase{
				allow("/token1", "", false), allow("/token2", "", false),
				allow("/token1", jwt.TokenIssuer1, true), allow("/token2", jwt.TokenIssuer1, false),
				allow("/token1", jwt.TokenIssuer2, false), allow("/token2", jwt.TokenIssuer2, true),
				allow("/token3", jwt.TokenIssuer1, false), allow("/token3", jwt.TokenIssuer2, true),
				allow("/tokenAny", jwt.TokenIssuer1, true), allow("/tokenAny", jwt.TokenIssuer2, true),
				allow("/permission", jwt.TokenIssuer1, false), allow("/permission", jwt.TokenIssuer2, false),
				allow("/permission", jwt.TokenIssuer2WithSpaceDelimitedPermission, true),
				allow("/scope", jwt.TokenIssuer2WithSpaceDelimitedScope, true), allow("/otherscope", jwt.TokenIssuer2WithSpaceDelimitedScope, false),
				allow("/custom-scope-admin", jwt.TokenIssuer2WithCustomScopeSpaceDelimitedScope, true),
				allow("/custom-scope-user", jwt.TokenIssuer2WithCustomScopeSpaceDelimitedScope, true),
				allow("/custom-scope-admin", "", false), allow("/custom-scope-user", "", false),
				allow("/custom-scope-admin", jwt.TokenIssuer1, false), allow("/custom-scope-user", jwt.TokenIssuer1, false),
				allow("/nested-key1", jwt.TokenIssuer1WithNestedClaims1, true), allow("/nested-key1", jwt.TokenIssuer1WithNestedClaims2, false),
				allow("/nested-key2", jwt.TokenIssuer1WithNestedClaims1, false), allow("/nested-key2", jwt.TokenIssuer1WithNestedClaims2, true),
				allow("/nested-2-key1", jwt.TokenIssuer1WithNestedClaims1, true), allow("/nested-2-key1", jwt.TokenIssuer1WithNestedClaims2, false),
				allow("/nested-non-exist", jwt.TokenIssuer1WithNestedClaims1, false), allow("/nested-non-exist", jwt.TokenIssuer1WithNestedClaims2, false),
				allow("/tokenAny", "", false),
				allow("/audiences", jwt.TokenIssuer1WithAud, true), allow("/audiences", jwt.TokenIssuer1WithAudList, true),
				// The policy's other request.auth rules, which TestAuthz_JWT's table does not call.
				allow("/valid-jwt", jwt.TokenIssuer1, true), allow("/valid-jwt", "", false),
				allow("/x/presenter", jwt.TokenIssuer1WithAzp, true), allow("/x/presenter", jwt.TokenIssuer1, false),
				allow("/audiences", jwt.TokenIssuer1, false),
			}},
		{source: "istio.io docs tasks/security/authorization/authz-jwt (RequestAuthentication only)",
			objects: sampleRA,
			cases: []jwtCase{
				{name: "invalid JWT is 401", header: bearer("invalidToken"), code: 401, body: authn.StatusBadFormat},
				ok("without JWT is 200"),
				ok("demo.jwt is 200", bearer(demo)...),
			}},
		{source: "istio.io docs tasks/security/authorization/authz-jwt (require-jwt)",
			objects: sampleRA + requireDemo,
			cases: []jwtCase{
				ok("valid JWT is 200", bearer(demo)...),
				{name: "without JWT is 403", code: 403, body: rbacDenied},
			}},
		{source: "istio.io docs tasks/security/authorization/authz-jwt (require-jwt with request.auth.claims[groups])",
			objects: sampleRA + `
---
kind: AuthorizationPolicy
metadata: {name: require-jwt}
spec:
` + toWeb + `  action: ALLOW
  rules:
  - from: [{source: {requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]}}]
    when: [{key: "request.auth.claims[groups]", values: ["group1"]}]
`,
			cases: []jwtCase{
				ok("groups-scope.jwt is 200", bearer(groupsScope)...),
				{name: "demo.jwt (no groups) is 403", header: bearer(demo), code: 403, body: rbacDenied},
			}},
		{source: "istio.io docs tasks/security/authentication/authn-policy (end-user authentication, require a valid token)",
			objects: sampleRA + `
---
kind: AuthorizationPolicy
metadata: {name: frontend-ingress}
spec:
` + toWeb + `  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
`,
			cases: []jwtCase{
				{name: "without token is 403", code: 403, body: rbacDenied},
				ok("valid token is 200", bearer(demo)...),
				{name: "invalid token is 401", header: bearer("deadbeef"), code: 401, body: authn.StatusBadFormat},
			}},
		{source: "istio.io docs tasks/security/authentication/authn-policy (require valid tokens per-path)",
			objects: sampleRA + `
---
kind: AuthorizationPolicy
metadata: {name: frontend-ingress}
spec:
` + toWeb + `  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/headers"]}}]
`,
			cases: []jwtCase{
				{name: "/headers without token is 403", path: "/headers", code: 403, body: rbacDenied},
				{name: "/ip without token is 200", path: "/ip", code: 200},
				{name: "/headers with token is 200", path: "/headers", header: bearer(demo), code: 200},
			}},
	}
}

// authzJWT is testdata/authz/jwt.yaml.tmpl, bound by targetRefs.
var authzJWT = `kind: RequestAuthentication
metadata: {name: default}
spec:
` + toWeb + `  jwtRules:
  - issuer: "test-issuer-1@istio.io"
    jwksUri: "{{JWKS}}/jwks"
  - issuer: "test-issuer-2@istio.io"
    jwksUri: "{{JWKS}}/jwks"
    spaceDelimitedClaims: ["custom_scope", "teams"]
---
kind: AuthorizationPolicy
metadata: {name: web}
spec:
` + toWeb + `  rules:
  - to: [{operation: {paths: ["/token1"], methods: ["GET"]}}]
    from: [{source: {requestPrincipals: ["test-issuer-1@istio.io/sub-1"]}}]
  - to: [{operation: {paths: ["/token2"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[groups]", values: ["group-2"]}]
  - to: [{operation: {paths: ["/tokenAny"], methods: ["GET"]}}]
    from: [{source: {requestPrincipals: ["*"]}}]
  - to: [{operation: {paths: ["/scope"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[scope]", values: ["append", "write"]}]
  - to: [{operation: {paths: ["/otherscope"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[scope]", values: ["admin"]}]
  - to: [{operation: {paths: ["/permission"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[permission]", values: ["write", "append"]}]
  - to: [{operation: {paths: ["/custom-scope-admin"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[custom_scope]", values: ["admin"]}]
  - to: [{operation: {paths: ["/custom-scope-user"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[custom_scope]", values: ["user"]}]
  - to: [{operation: {paths: ["/nested-key1"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[nested][key1]", values: ["valueB"]}]
  - to: [{operation: {paths: ["/nested-non-exist"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[nested][non-exist]", values: ["valueC"]}]
  - to: [{operation: {paths: ["/nested-key2"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[nested][key2]", values: ["valueC"]}]
  - to: [{operation: {paths: ["/nested-2-key1"], methods: ["GET"]}}]
    when: [{key: "request.auth.claims[nested][nested-2][key1]", values: ["valueA"]}]
  - to: [{operation: {paths: ["/valid-jwt"]}}]
    when: [{key: "request.auth.principal", values: ["*"]}]
  - to: [{operation: {paths: ["*/presenter"]}}]
    when: [{key: "request.auth.presenter", values: ["bar"]}]
  - to: [{operation: {paths: ["*/audiences"]}}]
    when: [{key: "request.auth.audiences", values: ["foo"]}]
  - to: [{operation: {paths: ["/token3"], methods: ["GET"]}}]
    from: [{source: {notRequestPrincipals: ["test-issuer-1@istio.io/sub-1"]}}]
`

// tokenName names an Istio test token in case names.
func tokenName(tok string) string {
	for name, v := range map[string]string{"": "no-jwt", jwt.TokenIssuer1: "TokenIssuer1", jwt.TokenIssuer2: "TokenIssuer2",
		jwt.TokenIssuer1WithAud: "TokenIssuer1WithAud", jwt.TokenIssuer1WithAudList: "TokenIssuer1WithAudList",
		jwt.TokenIssuer1WithAzp: "TokenIssuer1WithAzp", jwt.TokenIssuer1WithNestedClaims1: "TokenIssuer1WithNestedClaims1",
		jwt.TokenIssuer1WithNestedClaims2: "TokenIssuer1WithNestedClaims2", jwt.TokenIssuer2WithSpaceDelimitedPermission: "TokenIssuer2WithSpaceDelimitedPermission",
		jwt.TokenIssuer2WithSpaceDelimitedScope:            "TokenIssuer2WithSpaceDelimitedScope",
		jwt.TokenIssuer2WithCustomScopeSpaceDelimitedScope: "TokenIssuer2WithCustomScopeSpaceDelimitedScope"} {
		if tok == name {
			return v
		}
	}
	return "token"
}
