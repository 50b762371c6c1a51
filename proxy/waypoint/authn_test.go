package waypoint_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// Through the waypoint, per request: a token that fails gets Envoy's 401 with its status and
// WWW-Authenticate before any policy; a valid one gives the request principal a policy admits;
// no token is no principal (the ALLOW does not match: 403), and the next request on the same
// connection is decided on its own.
func TestHTTPRequestAuthentication(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k", Algorithm: "ES256"}}})
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k"))
	if err != nil {
		t.Fatal(err)
	}
	sign := func(exp time.Time) string {
		tok, err := jwt.Signed(sig).Claims(map[string]any{"iss": "issuer", "sub": "alice", "exp": exp.Unix()}).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	toWeb := []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}}
	ra := &authn.Policy{Namespace: "demo", Name: "jwt", Spec: &secv1beta1.RequestAuthentication{TargetRefs: toWeb,
		JwtRules: []*secv1beta1.JWTRule{{Issuer: "issuer", Jwks: string(jwks)}}}}
	allow := &authz.Policy{Namespace: "demo", Name: "alice", Spec: &secv1beta1.AuthorizationPolicy{TargetRefs: toWeb,
		Rules: []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{RequestPrincipals: []string{"issuer/alice"}}}}}}}}
	a := authn.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authn.Policy{ra}, nil, nil)
	for _, inspect := range []waypoint.Inspect{waypoint.InspectAuto, waypoint.InspectOpaque} {
		t.Run(fmt.Sprint("inspect=", inspect), func(t *testing.T) { checkRequestAuthentication(t, inspect, a, sign, allow) })
	}
	// inspect: opaque too: a RequestAuthentication on the service has its requests parsed, and
	// an opaque stream's ALLOW on requestPrincipals can never match (no 401 exists for TCP).
	b := newHTTPBed(t, route.Port{Name: "tcp-web", Port: 80}, func(h *waypoint.Handler) {
		h.Authn = func() *authn.Authenticator { return a }
	}, allow)
	c, _ := b.httpClient(t, false)
	req, _ := http.NewRequest("GET", "http://10.96.0.20:80/", nil)
	req.Header.Set("Authorization", "Bearer "+sign(time.Now().Add(time.Hour)))
	if resp, err := c.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("a declared TCP port with an ALLOW on requestPrincipals: %d, want the CONNECT refused", resp.StatusCode)
	}
}

func checkRequestAuthentication(t *testing.T, inspect waypoint.Inspect, a *authn.Authenticator, sign func(time.Time) string, allow *authz.Policy) {
	b := newHTTPBed(t, route.Port{Name: "web", Port: 80}, func(h *waypoint.Handler) {
		h.Authn = func() *authn.Authenticator { return a }
		h.Inspect = inspect
	}, allow)
	c, streams := b.httpClient(t, false)
	for _, tc := range []struct {
		name, auth string
		code       int
		body       string
	}{
		{"valid", "Bearer " + sign(time.Now().Add(time.Hour)), 200, ""},
		{"expired", "Bearer " + sign(time.Now().Add(-time.Hour)), 401, "Jwt is expired"},
		{"no token", "", 403, "RBAC: access denied"},
		{"malformed", "Bearer deadbeef", 401, authn.StatusBadFormat},
		{"valid again", "Bearer " + sign(time.Now().Add(time.Hour)), 200, ""},
	} {
		var hdr []string
		if tc.auth != "" {
			hdr = []string{"Authorization", tc.auth}
		}
		code, body, h := get(t, c, "http://10.96.0.20:80/p?q=1", hdr...)
		if code != tc.code || tc.body != "" && body != tc.body {
			t.Errorf("%s: %d %q, want %d %q", tc.name, code, body, tc.code, tc.body)
		}
		if code == 401 {
			if got, want := h.Get("Www-Authenticate"), `Bearer realm="http://10.96.0.20:80/p", error="invalid_token"`; got != want {
				t.Errorf("%s: WWW-Authenticate %q, want %q", tc.name, got, want)
			}
		}
	}
	if *streams != 1 {
		t.Errorf("%d client streams, want 1 (a 401 keeps the connection)", *streams)
	}

	// gRPC: Envoy's local reply maps 401 to UNAUTHENTICATED, in a trailers-only response.
	h2, _ := b.httpClient(t, true)
	req, _ := http.NewRequest("POST", "http://10.96.0.20:80/pkg.Svc/Call", strings.NewReader(""))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Authorization", "Bearer "+sign(time.Now().Add(-time.Hour)))
	resp, err := h2.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Grpc-Status") != "16" || resp.Header.Get("Grpc-Message") != authn.StatusExpired {
		t.Errorf("gRPC with an expired token: %d grpc-status %q %q, want 200, 16, %q", resp.StatusCode,
			resp.Header.Get("Grpc-Status"), resp.Header.Get("Grpc-Message"), authn.StatusExpired)
	}
}
