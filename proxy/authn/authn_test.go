package authn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/proxy/authz"
)

var (
	wp    = authz.Waypoint{Namespace: "demo", Gateway: "detour"}
	web   = authz.Service{Namespace: "demo", Name: "web"}
	toWeb = []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}}
	epoch = time.Unix(1_700_000_000, 0)
)

// signer is a test issuer's key: a real ECDSA key, tokens signed by go-jose.
type signer struct {
	key  *ecdsa.PrivateKey
	kid  string
	jwks string
}

func newSigner(t testing.TB, kid string) *signer {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: kid, Algorithm: string(jose.ES256), Use: "sig"}}}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return &signer{key: key, kid: kid, jwks: string(b)}
}

func (s *signer) sign(t testing.TB, claims map[string]any) string {
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if s.kid != "" {
		opts = opts.WithHeader("kid", s.kid)
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: s.key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func claims(iss, sub string, extra ...any) map[string]any {
	c := map[string]any{"iss": iss, "sub": sub, "exp": epoch.Add(time.Hour).Unix(), "iat": epoch.Unix()}
	for i := 0; i+1 < len(extra); i += 2 {
		c[extra[i].(string)] = extra[i+1]
	}
	return c
}

func ra(name string, rules ...*secv1beta1.JWTRule) *Policy {
	return &Policy{Namespace: "demo", Name: name, Spec: &secv1beta1.RequestAuthentication{TargetRefs: toWeb, JwtRules: rules}}
}

func request(t testing.TB, target string, hdr ...string) *http.Request {
	r := httptest.NewRequest("GET", target, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Add(hdr[i], hdr[i+1])
	}
	return r
}

func bearer(tok string) []string { return []string{"Authorization", "Bearer " + tok} }

// status is the failure's status text, "" for none.
func status(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	if err != nil {
		return "unexpected: " + err.Error()
	}
	return ""
}

func TestAuthenticate(t *testing.T) {
	iss1, iss2, other := newSigner(t, "k1"), newSigner(t, "k2"), newSigner(t, "k1")
	rule1 := &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks}
	rule2 := &secv1beta1.JWTRule{Issuer: "iss2", Jwks: iss2.jwks}
	good := iss1.sign(t, claims("iss1", "alice"))
	for _, tc := range []struct {
		name      string
		policies  []*Policy
		req       *http.Request
		status    string // "" : accepted
		principal string // "": no JWT
	}{
		{"no token: no principal, no error", []*Policy{ra("a", rule1)}, request(t, "/"), "", ""},
		{"valid token", []*Policy{ra("a", rule1)}, request(t, "/", bearer(good)...), "", "iss1/alice"},
		{"the Bearer prefix is case-sensitive, as Envoy's", []*Policy{ra("a", rule1)}, request(t, "/", "Authorization", "bearer "+good), "", ""},
		{"the prefix anywhere in the value, the token the base64url run after it", []*Policy{ra("a", rule1)}, request(t, "/", "Authorization", "x, Bearer  "+good+" trailing"), "", "iss1/alice"},
		{"other scheme: no token", []*Policy{ra("a", rule1)}, request(t, "/", "Authorization", "Basic "+good), "", ""},
		{"default access_token parameter", []*Policy{ra("a", rule1)}, request(t, "/?access_token="+good), "", "iss1/alice"},
		{"expired", []*Policy{ra("a", rule1)}, request(t, "/", bearer(iss1.sign(t, claims("iss1", "alice", "exp", epoch.Add(-61*time.Second).Unix())))...), StatusExpired, ""},
		{"expired within Envoy's 60 s skew", []*Policy{ra("a", rule1)}, request(t, "/", bearer(iss1.sign(t, claims("iss1", "alice", "exp", epoch.Add(-59*time.Second).Unix())))...), "", "iss1/alice"},
		{"not yet valid", []*Policy{ra("a", rule1)}, request(t, "/", bearer(iss1.sign(t, claims("iss1", "alice", "nbf", epoch.Add(2*time.Minute).Unix())))...), StatusNotYetValid, ""},
		{"exp not an integer", []*Policy{ra("a", rule1)}, request(t, "/", bearer(iss1.sign(t, claims("iss1", "alice", "exp", "soon")))...), StatusExpNotInteger, ""},
		{"unknown issuer", []*Policy{ra("a", rule1)}, request(t, "/", bearer(iss2.sign(t, claims("iss2", "bob")))...), StatusUnknownIssuer, ""},
		{"signed by another key with the same kid", []*Policy{ra("a", rule1)}, request(t, "/", bearer(other.sign(t, claims("iss1", "alice")))...), StatusVerificationFail, ""},
		{"kid not in the key set", []*Policy{ra("a", rule1)}, request(t, "/", bearer(iss2.sign(t, claims("iss1", "alice")))...), StatusNoKey, ""},
		{"no kid: every key is tried", []*Policy{ra("a", rule1)}, request(t, "/", bearer((&signer{key: iss1.key}).sign(t, claims("iss1", "alice")))...), "", "iss1/alice"},
		{"not a JWT", []*Policy{ra("a", rule1)}, request(t, "/", bearer("deadbeef")...), StatusBadFormat, ""},
		{"tampered payload", []*Policy{ra("a", rule1)}, request(t, "/", bearer(tamper(good))...), StatusVerificationFail, ""},
		{"audience allowed", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, Audiences: []string{"foo"}})}, request(t, "/", bearer(iss1.sign(t, claims("iss1", "alice", "aud", []string{"bar", "foo"})))...), "", "iss1/alice"},
		{"audience compared without scheme and trailing slash", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, Audiences: []string{"https://foo/"}})}, request(t, "/", bearer(iss1.sign(t, claims("iss1", "alice", "aud", "foo")))...), "", "iss1/alice"},
		{"audience not allowed", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, Audiences: []string{"foo"}})}, request(t, "/", bearer(good)...), StatusAudience, ""},
		{"two rules: the second issuer's token", []*Policy{ra("a", rule1, rule2)}, request(t, "/", bearer(iss2.sign(t, claims("iss2", "bob")))...), "", "iss2/bob"},
		{"two rules: unknown issuer", []*Policy{ra("a", rule1, rule2)}, request(t, "/", bearer(other.sign(t, claims("iss3", "eve")))...), StatusUnknownIssuer, ""},
		{"two rules: expired is reported, not unknown issuer", []*Policy{ra("a", rule1, rule2)}, request(t, "/", bearer(iss2.sign(t, claims("iss2", "bob", "exp", epoch.Add(-time.Hour).Unix())))...), StatusExpired, ""},
		{"two policies combine: one rule's audience fails, the other's passes", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss2", Jwks: iss2.jwks, Audiences: []string{"bar"}}), ra("b", rule2)}, request(t, "/", bearer(iss2.sign(t, claims("iss2", "bob")))...), "", "iss2/bob"},
		{"fromHeaders with prefix", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, FromHeaders: []*secv1beta1.JWTHeader{{Name: "x-jwt-token", Prefix: "Value "}}})}, request(t, "/", "X-Jwt-Token", "Value "+good), "", "iss1/alice"},
		{"fromHeaders: Authorization is no longer read", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, FromHeaders: []*secv1beta1.JWTHeader{{Name: "x-jwt-token"}}})}, request(t, "/", bearer("deadbeef")...), "", ""},
		{"fromParams", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, FromParams: []string{"token"}})}, request(t, "/?token="+good), "", "iss1/alice"},
		{"fromParams: two tokens, one expired", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, FromParams: []string{"token", "second"}})}, request(t, "/?token="+good+"&second="+iss1.sign(t, claims("iss1", "alice", "exp", 1))), StatusExpired, ""},
		{"fromCookies", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss1.jwks, FromCookies: []string{"session"}})}, request(t, "/", "Cookie", "a=b; session="+good), "", "iss1/alice"},
		{"CORS preflight is not authenticated", []*Policy{ra("a", rule1)}, withMethod("OPTIONS", request(t, "/", "Origin", "https://istio.io", "Access-Control-Request-Method", "POST", "Authorization", "Bearer deadbeef")), "", ""},
		{"OPTIONS without Origin is", []*Policy{ra("a", rule1)}, withMethod("OPTIONS", request(t, "/", "Access-Control-Request-Method", "POST", "Authorization", "Bearer deadbeef")), StatusBadFormat, ""},
		{"a selector policy does not apply at a waypoint", []*Policy{{Namespace: "demo", Name: "sel", Spec: &secv1beta1.RequestAuthentication{Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}}, JwtRules: []*secv1beta1.JWTRule{rule1}}}}, request(t, "/", bearer("deadbeef")...), "", ""},
		{"a policy without target does not apply", []*Policy{{Namespace: "demo", Name: "none", Spec: &secv1beta1.RequestAuthentication{JwtRules: []*secv1beta1.JWTRule{rule1}}}}, request(t, "/", bearer("deadbeef")...), "", ""},
		{"a Service in another namespace does not apply", []*Policy{{Namespace: "other", Name: "x", Spec: &secv1beta1.RequestAuthentication{TargetRefs: toWeb, JwtRules: []*secv1beta1.JWTRule{rule1}}}}, request(t, "/", bearer("deadbeef")...), "", ""},
		{"the waypoint's Gateway applies", []*Policy{{Namespace: "demo", Name: "gw", Spec: &secv1beta1.RequestAuthentication{TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}}, JwtRules: []*secv1beta1.JWTRule{rule1}}}}, request(t, "/", bearer("deadbeef")...), StatusBadFormat, ""},
		{"the GatewayClass from the root namespace applies", []*Policy{{Namespace: "istio-system", Name: "all", Spec: &secv1beta1.RequestAuthentication{TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "GatewayClass", Name: "istio-waypoint"}}, JwtRules: []*secv1beta1.JWTRule{rule1}}}}, request(t, "/", bearer("deadbeef")...), StatusBadFormat, ""},
		{"an inline jwks that does not parse fails closed", []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: "{not json"})}, request(t, "/", bearer(good)...), StatusVerificationFail, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := New(wp, tc.policies, nil, func() time.Time { return epoch })
			j, err := a.Authenticate(context.Background(), tc.req, web)
			if got := status(err); got != tc.status {
				t.Fatalf("status %q, want %q", got, tc.status)
			}
			got := ""
			if j != nil {
				got = j.Principal
			}
			if got != tc.principal {
				t.Fatalf("principal %q, want %q", got, tc.principal)
			}
		})
	}
}

func withMethod(m string, r *http.Request) *http.Request { r.Method = m; return r }

func tamper(tok string) string {
	p := strings.Split(tok, ".")
	p[1] = p[1][:len(p[1])-2] + "AA"
	return strings.Join(p, ".")
}

// The audience failure is Envoy's 403; every other a 401.
func TestErrorCodes(t *testing.T) {
	if c := (&Error{Status: StatusAudience}).Code(); c != 403 {
		t.Errorf("audience: %d", c)
	}
	if c := (&Error{Status: StatusExpired}).Code(); c != 401 {
		t.Errorf("expired: %d", c)
	}
	if s := (&Error{Status: StatusExpired, Issuer: "iss1"}).Error(); s != "authn: iss1: Jwt is expired" {
		t.Errorf("text %q", s)
	}
}

// What a verified token does to the request: the token header goes (unless
// forwardOriginalToken), the payload and claims go to their headers (a client's own values
// dropped first), and the JWT carries audiences, presenter and claims, scope split at spaces.
func TestOutputs(t *testing.T) {
	iss := newSigner(t, "k1")
	tok := iss.sign(t, claims("iss1", "alice", "aud", "foo", "azp", "client", "scope", "read write",
		"nested", map[string]any{"key": "v", "n": 7}, "groups", []string{"a", "b"}))
	rule := &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss.jwks, OutputPayloadToHeader: "x-payload",
		OutputClaimToHeaders: []*secv1beta1.ClaimToHeader{{Header: "x-nested", Claim: "nested.key"}, {Header: "x-n", Claim: "nested.n"},
			{Header: "x-groups", Claim: "groups"}, {Header: "x-scope", Claim: "scope"}, {Header: "x-absent", Claim: "nope"}}}
	a := New(wp, []*Policy{ra("a", rule)}, nil, func() time.Time { return epoch })
	r := request(t, "/", "Authorization", "Bearer "+tok, "X-Payload", "forged", "X-Absent", "forged")
	j, err := a.Authenticate(context.Background(), r, web)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"Authorization": "", "X-Payload": strings.Split(tok, ".")[1], "X-Nested": "v", "X-N": "7",
		"X-Groups": base64.StdEncoding.EncodeToString([]byte(`["a","b"]`)), "X-Scope": "read write", "X-Absent": ""}
	for k, v := range want {
		if got := r.Header.Get(k); got != v {
			t.Errorf("%s: %q, want %q", k, got, v)
		}
	}
	if j.Presenter != "client" || len(j.Audiences) != 1 || j.Audiences[0] != "foo" {
		t.Errorf("jwt %+v", j)
	}
	if got := authz.ClaimStrings(j.Claims, []string{"scope"}); strings.Join(got, "|") != "read|write" {
		t.Errorf("scope claim for policies: %q", got)
	}

	rule.ForwardOriginalToken = true
	a = New(wp, []*Policy{ra("a", rule)}, nil, func() time.Time { return epoch })
	r = request(t, "/", bearer(tok)...)
	if _, err := a.Authenticate(context.Background(), r, web); err != nil || r.Header.Get("Authorization") != "Bearer "+tok {
		t.Errorf("forwardOriginalToken: %v, Authorization %q", err, r.Header.Get("Authorization"))
	}
}

// jwksServer is a real JWKS endpoint: it counts fetches and can be made to fail.
type jwksServer struct {
	*httptest.Server
	hits atomic.Int32
	mu   sync.Mutex
	body string
	code int
}

func newJWKSServer(t *testing.T, body string) *jwksServer {
	s := &jwksServer{body: body, code: 200}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		s.mu.Lock()
		code, body := s.code, s.body
		s.mu.Unlock()
		w.WriteHeader(code)
		w.Write([]byte(body))
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) set(code int, body string) {
	s.mu.Lock()
	s.code, s.body = code, body
	s.mu.Unlock()
}

// jwksUri: fetched once and cached; refreshed once Refresh has passed; a failed refresh keeps
// the last good set; a set never had fails the token closed (401 Jwt verification fails), and is
// tried again only after Retry.
func TestJWKSURI(t *testing.T) {
	iss := newSigner(t, "k1")
	srv := newJWKSServer(t, iss.jwks)
	now := epoch
	clock := func() time.Time { return now }
	keys := &Keys{Now: clock, Refresh: time.Minute, Retry: 10 * time.Second}
	a := New(wp, []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", JwksUri: srv.URL + "/jwks.json"})}, keys, clock)
	tok := iss.sign(t, claims("iss1", "alice", "exp", epoch.Add(time.Hour).Unix()))
	check := func(want string) {
		t.Helper()
		if _, err := a.Authenticate(context.Background(), request(t, "/", bearer(tok)...), web); status(err) != want {
			t.Fatalf("status %q, want %q", status(err), want)
		}
	}
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() { defer wg.Done(); check("") }()
	}
	wg.Wait()
	if n := srv.hits.Load(); n != 1 {
		t.Fatalf("20 requests fetched the key set %d times, want 1", n)
	}
	now = now.Add(2 * time.Minute)
	srv.set(500, "")
	check("") // stale set kept
	if n := srv.hits.Load(); n != 2 {
		t.Fatalf("a stale set was refreshed %d times, want once", n-1)
	}
	// The key rotates (same kid, another key): once refreshed, the token cached as verified is
	// checked against the new set, and fails.
	now = now.Add(2 * time.Minute)
	srv.set(200, newSigner(t, "k1").jwks)
	check(StatusVerificationFail)
	srv.set(200, iss.jwks)
	now = now.Add(2 * time.Minute)
	check("")
	hits := srv.hits.Load()
	// A new issuer whose keys cannot be had: its tokens fail, and the next fetch waits for Retry.
	srv.set(404, "")
	a2 := New(wp, []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", JwksUri: srv.URL + "/other.json"})}, keys, clock)
	for range 3 {
		if _, err := a2.Authenticate(context.Background(), request(t, "/", bearer(tok)...), web); status(err) != StatusVerificationFail {
			t.Fatalf("unavailable keys: %q, want %q", status(err), StatusVerificationFail)
		}
	}
	if n := srv.hits.Load(); n != hits+1 {
		t.Fatalf("an unavailable key set was fetched %d times in its retry interval, want once", n-hits)
	}
	// Requests without a token need no keys.
	if _, err := a2.Authenticate(context.Background(), request(t, "/"), web); err != nil {
		t.Fatal(err)
	}
}

// A key set is fetched within bounds: a body over MaxBytes, a document without keys and a
// server that never answers (Timeout) all fail closed.
func TestJWKSBounds(t *testing.T) {
	iss := newSigner(t, "k1")
	big := newJWKSServer(t, iss.jwks+strings.Repeat(" ", 2048))
	empty := newJWKSServer(t, `{"keys":[]}`)
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
	t.Cleanup(hang.Close)
	keys := &Keys{MaxBytes: 1024, Timeout: 50 * time.Millisecond}
	for _, uri := range []string{big.URL, empty.URL, hang.URL} {
		if _, err := keys.Get(context.Background(), uri, 0); !errors.Is(err, ErrKeys) {
			t.Errorf("%s: %v, want ErrKeys", uri, err)
		}
	}
	ok := newJWKSServer(t, iss.jwks)
	if set, err := keys.Get(context.Background(), ok.URL, 0); err != nil || len(set.Keys) != 1 {
		t.Errorf("a good set: %v, %v", set, err)
	}
}

// A token verified once is still checked for exp on every request (the cache keeps only the
// signature's verdict).
func TestVerifiedTokenStillExpires(t *testing.T) {
	iss := newSigner(t, "k1")
	now := epoch
	a := New(wp, []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss1", Jwks: iss.jwks})}, nil, func() time.Time { return now })
	tok := iss.sign(t, claims("iss1", "alice", "exp", epoch.Add(time.Minute).Unix()))
	for _, want := range []string{"", ""} {
		if _, err := a.Authenticate(context.Background(), request(t, "/", bearer(tok)...), web); status(err) != want {
			t.Fatalf("status %q, want %q", status(err), want)
		}
	}
	now = epoch.Add(time.Hour)
	if _, err := a.Authenticate(context.Background(), request(t, "/", bearer(tok)...), web); status(err) != StatusExpired {
		t.Fatalf("status %q, want %q", status(err), StatusExpired)
	}
}

// A rule with neither jwks nor jwksUri finds its keys as istiod does: the issuer's OpenID
// configuration names the jwks_uri.
func TestOpenIDConfiguration(t *testing.T) {
	iss := newSigner(t, "k1")
	var issuer string
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": issuer, "jwks_uri": issuer + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte(iss.jwks)) })
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	issuer = srv.URL
	a := New(wp, []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: issuer})}, nil, func() time.Time { return epoch })
	j, err := a.Authenticate(context.Background(), request(t, "/", bearer(iss.sign(t, claims(issuer, "alice")))...), web)
	if err != nil || j == nil || j.Principal != issuer+"/alice" {
		t.Fatalf("%v, %v", j, err)
	}
	// An issuer without one fails its tokens closed.
	a = New(wp, []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: srv.URL + "/nothing"})}, nil, func() time.Time { return epoch })
	if _, err := a.Authenticate(context.Background(), request(t, "/", bearer(iss.sign(t, claims(srv.URL+"/nothing", "alice")))...), web); status(err) != StatusVerificationFail {
		t.Fatalf("status %q", status(err))
	}
}
