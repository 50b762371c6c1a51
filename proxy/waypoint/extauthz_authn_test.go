package waypoint_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/extauthz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// Istio's waypoint runs the CUSTOM policy's ext_authz filter before jwt_authn (pilot
// listener_waypoint.go buildWaypointHTTPFilters). So a request with a token that fails, on a
// path a CUSTOM policy covers, gets the provider's denial when it denies, and Envoy's 401 only
// once it allows; and the CUSTOM rules are matched without request principals (the shadow RBAC
// filter sees no jwt_authn metadata): notRequestPrincipals ["*"] matches a request with a valid
// token, requestPrincipals ["*"] never matches. Both providers' forms, against real servers.
func TestExtAuthzBeforeRequestAuthentication(t *testing.T) {
	grpcSrv, gport := serveGRPCAuthz(t)
	httpSrv, hport := serveHTTPAuthz(t)
	jwks, sign := testIssuer(t)
	toWeb := []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}}
	ra := &authn.Policy{Namespace: "demo", Name: "jwt", Spec: &secv1beta1.RequestAuthentication{TargetRefs: toWeb,
		JwtRules: []*secv1beta1.JWTRule{{Issuer: "issuer", Jwks: jwks}}}}
	a := authn.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authn.Policy{ra}, nil, nil)
	customFrom := func(provider, name, path string, src *secv1beta1.Source) *authz.Policy {
		return &authz.Policy{Namespace: "demo", Name: name, Spec: &secv1beta1.AuthorizationPolicy{
			Action:       secv1beta1.AuthorizationPolicy_CUSTOM,
			ActionDetail: &secv1beta1.AuthorizationPolicy_Provider{Provider: &secv1beta1.AuthorizationPolicy_ExtensionProvider{Name: provider}},
			TargetRefs:   toWeb,
			Rules: []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: src}},
				To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Paths: []string{path}}}}}},
		}}
	}
	valid, expired := "Bearer "+sign(time.Now().Add(time.Hour)), "Bearer "+sign(time.Now().Add(-time.Hour))
	for _, tc := range []struct {
		name     string
		p        *meshv1alpha1.MeshConfig_ExtensionProvider
		calls    func() int32
		deniedBy string
	}{
		{"grpc", &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "g", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc{
			EnvoyExtAuthzGrpc: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider{Service: "127.0.0.1", Port: gport}}},
			grpcSrv.calls.Load, "grpc"},
		{"http", &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "h", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp{
			EnvoyExtAuthzHttp: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{Service: "127.0.0.1", Port: hport,
				IncludeRequestHeadersInCheck: []string{"x-ext-authz"}, HeadersToDownstreamOnDeny: []string{"x-denied-by"}}}},
			httpSrv.calls.Load, "http"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := &extauthz.Registry{}
			if err := reg.Update([]*meshv1alpha1.MeshConfig_ExtensionProvider{tc.p}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { reg.Close() })
			b := newHTTPBed(t, route.Port{Name: "http-web", Port: 80}, func(h *waypoint.Handler) {
				h.ExtAuthz, h.Inspect = reg, waypoint.InspectAuto
				h.Authn = func() *authn.Authenticator { return a }
			}, customPolicy(tc.p.GetName()),
				customFrom(tc.p.GetName(), "tokenless", "/tokenless*", &secv1beta1.Source{NotRequestPrincipals: []string{"*"}}),
				customFrom(tc.p.GetName(), "with-token", "/with-token*", &secv1beta1.Source{RequestPrincipals: []string{"*"}}))
			c, _ := b.httpClient(t, false)
			jwtRealm := `Bearer realm="http://10.96.0.20:80/protected/a", error="invalid_token"`
			for _, step := range []struct {
				name, path, decision, auth string
				code                       int
				body, wwwAuthenticate      string
				asked                      bool
			}{
				{"bad token, the provider denies: its answer", "/protected/a", "deny", "Bearer deadbeef", 401, "denied by " + tc.deniedBy, `Bearer realm="` + tc.deniedBy + `"`, true},
				{"expired token, the provider denies: its answer", "/protected/a", "deny", expired, 401, "denied by " + tc.deniedBy, `Bearer realm="` + tc.deniedBy + `"`, true},
				{"bad token, the provider allows: 401", "/protected/a", "allow", "Bearer deadbeef", 401, authn.StatusBadFormat, jwtRealm, true},
				{"expired token, the provider allows: 401", "/protected/a", "allow", expired, 401, authn.StatusExpired, jwtRealm, true},
				{"valid token, the provider allows", "/protected/a", "allow", valid, 200, "127.0.0.", "", true},
				{"not covered: bad token 401, no check", "/public", "deny", "Bearer deadbeef", 401, authn.StatusBadFormat, `Bearer realm="http://10.96.0.20:80/public", error="invalid_token"`, false},
				{"notRequestPrincipals matches a valid token", "/tokenless", "deny", valid, 401, "denied by " + tc.deniedBy, `Bearer realm="` + tc.deniedBy + `"`, true},
				{"requestPrincipals never matches", "/with-token", "deny", valid, 200, "127.0.0.", "", false},
			} {
				before := tc.calls()
				hdr := []string{"X-Ext-Authz", step.decision}
				if step.auth != "" {
					hdr = append(hdr, "Authorization", step.auth)
				}
				code, body, h := get(t, c, "http://10.96.0.20:80"+step.path, hdr...)
				if code != step.code || !strings.HasPrefix(body, step.body) {
					t.Errorf("%s: %d %.80q, want %d %q", step.name, code, body, step.code, step.body)
				}
				if got := h.Get("Www-Authenticate"); got != step.wwwAuthenticate {
					t.Errorf("%s: WWW-Authenticate %q, want %q", step.name, got, step.wwwAuthenticate)
				}
				if asked := tc.calls() > before; asked != step.asked {
					t.Errorf("%s: provider asked %v, want %v", step.name, asked, step.asked)
				}
			}
		})
	}
}

// testIssuer is a JWKS with one ES256 key and a signer of tokens from "issuer" for "alice".
func testIssuer(t *testing.T) (string, func(exp time.Time) string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k", Algorithm: "ES256"}}})
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k"))
	if err != nil {
		t.Fatal(err)
	}
	return string(jwks), func(exp time.Time) string {
		tok, err := jwt.Signed(sig).Claims(map[string]any{"iss": "issuer", "sub": "alice", "exp": exp.Unix()}).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
}
