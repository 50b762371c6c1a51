// Package authn validates request JWTs the way Istio's waypoint applies RequestAuthentication:
// only the objects whose targetRefs bind them to the waypoint's Gateway, the destination Service
// or the istio-waypoint GatewayClass (authz.Attached; selectors never apply at a waypoint) take
// part; their jwtRules become Envoy jwt_authn providers combined as istiod combines them
// (pilot/pkg/security/authn/policy_applier.go): a request may carry no token (then it has no
// request principal), but a token it carries must verify against a rule for its issuer, or the
// request is answered 401 (403 for audiences not allowed) with Envoy's status text, before any
// AuthorizationPolicy sees it. Signatures are verified with go-jose; key sets are inline (jwks)
// or fetched from jwksUri (see Keys).
package authn

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	secv1beta1 "istio.io/api/security/v1beta1"

	"github.com/detour-mesh/detour/proxy/authz"
)

// Policy is one RequestAuthentication object.
type Policy struct {
	Namespace, Name string
	Spec            *secv1beta1.RequestAuthentication
}

// clockSkew is Envoy's default clock_skew_seconds (istiod sets none): exp and nbf are checked
// with this much leeway.
const clockSkew = 60 * time.Second

// algorithms are the signature algorithms a token may use (Envoy's jwt_verify_lib supports the
// same asymmetric ones; HMAC keys are not offered by Istio's jwks).
var algorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512,
	jose.ES256, jose.ES384, jose.ES512, jose.EdDSA,
}

// Authenticator holds the RequestAuthentications of one config. Immutable but for its cache of
// compiled rules per destination; the Keys are shared between configs.
type Authenticator struct {
	wp       authz.Waypoint
	policies []*Policy
	keys     *Keys
	now      func() time.Time

	rules    sync.Map // authz.Service → []*rule, compiled on first use
	verified verifiedCache
}

// New builds an authenticator for waypoint wp. keys fetches jwksUri key sets (nil: a Keys of
// its own); now is the clock for exp and nbf (nil: time.Now).
func New(wp authz.Waypoint, policies []*Policy, keys *Keys, now func() time.Time) *Authenticator {
	if keys == nil {
		keys = &Keys{}
	}
	if now == nil {
		now = time.Now
	}
	return &Authenticator{wp: wp, policies: policies, keys: keys, now: now}
}

// rule is one jwtRule, compiled.
type rule struct {
	spec   *secv1beta1.JWTRule
	locs   []location
	inline *jose.JSONWebKeySet // from jwks; nil: fetch jwksUri
	keyErr error               // the inline jwks does not parse
	spaced []string            // space-delimited claims
}

// Applies reports whether a RequestAuthentication binds to dst at this waypoint.
func (a *Authenticator) Applies(dst authz.Service) bool {
	return a != nil && len(a.rulesFor(dst)) > 0
}

func (a *Authenticator) rulesFor(dst authz.Service) []*rule {
	if v, ok := a.rules.Load(dst); ok {
		return v.([]*rule)
	}
	var out []*rule
	for _, p := range a.policies {
		if !authz.Attached(p.Spec.GetTargetRefs(), p.Spec.GetTargetRef(), p.Namespace, a.wp, dst) {
			continue
		}
		for _, jr := range p.Spec.GetJwtRules() {
			out = append(out, compile(jr))
		}
	}
	// istiod sorts the rules of every applying policy by issuer; the order decides which
	// failure is reported.
	slices.SortStableFunc(out, func(x, y *rule) int { return strings.Compare(x.spec.GetIssuer(), y.spec.GetIssuer()) })
	a.rules.Store(dst, out)
	return out
}

func compile(jr *secv1beta1.JWTRule) *rule {
	r := &rule{spec: jr, locs: locations(jr), spaced: append([]string{"scope", "permission"}, jr.GetSpaceDelimitedClaims()...)}
	if jr.GetJwks() != "" {
		r.inline, r.keyErr = parseKeySet("inline jwks of "+jr.GetIssuer(), []byte(jr.GetJwks()))
	}
	return r
}

// Authenticate validates the tokens of r, for destination dst, and edits r's headers as Envoy
// does on success: a verified token's header is removed unless forwardOriginalToken, the
// payload and claims are written to the rule's output headers (and a client's own values of
// those headers are dropped first). It returns the request's JWT (nil when it carried none, or
// no rule applies) or an *Error. A CORS preflight is not authenticated (istiod's
// bypass_cors_preflight).
func (a *Authenticator) Authenticate(ctx context.Context, r *http.Request, dst authz.Service) (*authz.JWT, error) {
	if a == nil {
		return nil, nil
	}
	rules := a.rulesFor(dst)
	if len(rules) == 0 {
		return nil, nil
	}
	for _, ru := range rules {
		if h := ru.spec.GetOutputPayloadToHeader(); h != "" {
			r.Header.Del(h)
		}
		for _, c := range ru.spec.GetOutputClaimToHeaders() {
			r.Header.Del(c.GetHeader())
		}
	}
	if preflight(r) {
		return nil, nil
	}
	var query map[string][]string
	if r.URL != nil && r.URL.RawQuery != "" {
		query = r.URL.Query()
	}
	cookies := func(name string) string {
		c, err := r.Cookie(name)
		if err != nil {
			return ""
		}
		return c.Value
	}
	results := make([]result, len(rules))
	for i, ru := range rules {
		results[i] = a.verifyRule(ctx, ru, extract(ru.locs, r.Header, query, cookies))
	}
	ok, err := combine(rules, results)
	if err != nil {
		return nil, err
	}
	var out *authz.JWT
	for _, i := range ok {
		ru, res := rules[i], results[i]
		for _, v := range res.verified {
			output(r.Header, ru, v)
			if out == nil {
				out = v.jwt
			}
		}
	}
	return out, nil
}

// preflight: an OPTIONS request with Origin and Access-Control-Request-Method (Envoy's
// bypass_cors_preflight, which istiod sets).
func preflight(r *http.Request) bool {
	return r.Method == http.MethodOptions && r.Header.Get("Origin") != "" && r.Header.Get("Access-Control-Request-Method") != ""
}

// output applies a verified token's effects on the request headers.
func output(h http.Header, ru *rule, v verified) {
	if !ru.spec.GetForwardOriginalToken() && v.at.header != "" {
		h.Del(v.at.header) // Envoy removes a header token; parameter and cookie tokens stay
	}
	if name := ru.spec.GetOutputPayloadToHeader(); name != "" {
		h.Add(name, v.payload) // added, as Envoy (the client's copy was dropped before)
	}
	for _, c := range ru.spec.GetOutputClaimToHeaders() {
		if s := claimHeader(v.claims, c.GetClaim()); s != "" {
			h.Add(c.GetHeader(), s)
		}
	}
}

// result is one rule's outcome: missing (no token at its locations), verified tokens, or a
// failure status.
type result struct {
	missing  bool
	status   string // "" when ok or missing
	verified []verified
}

type verified struct {
	at      location
	payload string         // the token's payload, base64url as sent
	claims  map[string]any // as sent, for outputClaimToHeaders
	jwt     *authz.JWT
}

// combine decides as istiod's requirement does: one rule is "rule OR missing"; several are
// "any rule OR all of (each rule OR missing)" (policy_applier.go convertToEnvoyJwtConfig), and a
// failure is reported as Envoy's requires_any aggregates its children (verifier.cc): the last
// status that is neither missing nor unknown issuer, else unknown issuer. ok lists the rules
// whose tokens verified.
func combine(rules []*rule, results []result) (ok []int, err error) {
	for i, res := range results {
		if !res.missing && res.status == "" {
			ok = append(ok, i)
		}
	}
	if len(results) == 1 {
		if results[0].status != "" {
			return nil, &Error{Status: results[0].status, Issuer: rules[0].spec.GetIssuer()}
		}
		return ok, nil
	}
	if len(ok) > 0 {
		return ok, nil
	}
	// No rule verified a token: all of (rule OR missing), its first failure as its status.
	all := ""
	for _, res := range results {
		if res.status != "" {
			all = res.status
			break
		}
	}
	if all == "" {
		return nil, nil // every rule missing: no token
	}
	final, issuer := StatusMissing, ""
	for i, st := range append(statuses(results), all) {
		if st != StatusMissing && st != StatusUnknownIssuer || final == StatusMissing {
			final = st
			if i < len(rules) {
				issuer = rules[i].spec.GetIssuer()
			}
		}
	}
	return nil, &Error{Status: final, Issuer: issuer}
}

func statuses(results []result) []string {
	out := make([]string, len(results))
	for i, res := range results {
		out[i] = res.status
		if res.missing {
			out[i] = StatusMissing
		}
	}
	return out
}

// verifyRule checks each token found at the rule's locations, in order; the first failure is
// the rule's.
func (a *Authenticator) verifyRule(ctx context.Context, ru *rule, tokens []token) result {
	if len(tokens) == 0 {
		return result{missing: true}
	}
	var res result
	for _, t := range slices.Backward(tokens) { // Envoy verifies the last found first
		v, status := a.verify(ctx, ru, t)
		if status != "" {
			return result{status: status}
		}
		res.verified = append(res.verified, v)
	}
	return res
}

// verify checks one token as Envoy's authenticator, in its order: the form, the issuer, exp and
// nbf, the audiences, then the signature with the rule's key set (once per token and key set:
// see verifiedCache).
func (a *Authenticator) verify(ctx context.Context, ru *rule, t token) (verified, string) {
	if c := a.verified.get(ru, t.raw); c != nil {
		if set, err := a.keySet(ctx, ru); err == nil && set == c.set {
			j, status := a.checkClaims(ru, c.claims)
			if status != "" {
				return verified{}, status
			}
			return verified{at: t.at, payload: c.payload, claims: c.claims, jwt: j}, ""
		}
	}
	parts := strings.Split(t.raw, ".")
	if len(parts) != 3 {
		return verified{}, StatusBadFormat
	}
	tok, err := jwt.ParseSigned(t.raw, algorithms)
	if err != nil {
		return verified{}, StatusVerificationFail
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return verified{}, StatusVerificationFail
	}
	claims, err := decodeClaims(payload)
	if err != nil {
		return verified{}, StatusVerificationFail
	}
	j, status := a.checkClaims(ru, claims)
	if status != "" {
		return verified{}, status
	}
	set, err := a.keySet(ctx, ru)
	if err != nil {
		return verified{}, StatusVerificationFail // fail closed, as istiod's fake key set does
	}
	if status := checkSignature(set, tok); status != "" {
		return verified{}, status
	}
	a.verified.put(ru, t.raw, &cached{set: set, claims: claims, payload: parts[1]})
	return verified{at: t.at, payload: parts[1], claims: claims, jwt: j}, ""
}

// checkClaims checks iss, exp, nbf and aud, and builds the request's JWT.
func (a *Authenticator) checkClaims(ru *rule, claims map[string]any) (*authz.JWT, string) {
	iss, ok := optString(claims["iss"])
	if !ok {
		return nil, StatusIssNotString
	}
	if iss != ru.spec.GetIssuer() {
		return nil, StatusUnknownIssuer
	}
	sub, ok := optString(claims["sub"])
	if !ok {
		return nil, StatusSubNotString
	}
	exp, ok := optInt(claims["exp"])
	if !ok {
		return nil, StatusExpNotInteger
	}
	nbf, ok := optInt(claims["nbf"])
	if !ok {
		return nil, StatusNbfNotInteger
	}
	// jwt_verify_lib's verifyTimeConstraint: nbf, then exp, each with the skew.
	now := a.now()
	if nbf != 0 && now.Add(clockSkew).Before(time.Unix(nbf, 0)) {
		return nil, StatusNotYetValid
	}
	if exp != 0 && now.After(time.Unix(exp, 0).Add(clockSkew)) {
		return nil, StatusExpired
	}
	aud, ok := audiences(claims["aud"])
	if !ok {
		return nil, StatusAudNotString
	}
	if want := ru.spec.GetAudiences(); len(want) > 0 && !audienceAllowed(want, aud) {
		return nil, StatusAudience
	}
	azp, _ := claims["azp"].(string)
	return &authz.JWT{Principal: iss + "/" + sub, Audiences: aud, Presenter: azp, Claims: splitSpaced(claims, ru.spaced)}, ""
}

// keySet is the rule's key set: inline, fetched from jwksUri, or (neither given) found through
// the issuer's OpenID configuration.
func (a *Authenticator) keySet(ctx context.Context, ru *rule) (*jose.JSONWebKeySet, error) {
	if ru.inline != nil || ru.keyErr != nil {
		return ru.inline, ru.keyErr
	}
	if uri := ru.spec.GetJwksUri(); uri != "" {
		return a.keys.Get(ctx, uri, ru.spec.GetTimeout().AsDuration())
	}
	return a.keys.ForIssuer(ctx, ru.spec.GetIssuer(), ru.spec.GetTimeout().AsDuration())
}

// checkSignature verifies tok with set: the key its kid names, else each key.
func checkSignature(set *jose.JSONWebKeySet, tok *jwt.JSONWebToken) string {
	keys := set.Keys
	if kid := tok.Headers[0].KeyID; kid != "" {
		keys = set.Key(kid)
		if len(keys) == 0 {
			return StatusNoKey
		}
	}
	for _, k := range keys {
		if k.Use == "enc" || !k.Valid() {
			continue
		}
		var discard json.RawMessage
		if err := tok.Claims(k.Public(), &discard); err == nil {
			return ""
		}
	}
	return StatusVerificationFail
}

// decodeClaims decodes a payload object, numbers kept as written.
func decodeClaims(payload []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	var claims map[string]any
	if err := dec.Decode(&claims); err != nil {
		return nil, err
	}
	if claims == nil {
		claims = map[string]any{}
	}
	return claims, nil
}

func optString(v any) (string, bool) {
	if v == nil {
		return "", true
	}
	s, ok := v.(string)
	return s, ok
}

// optInt reads an integer claim (exp, nbf); absent is 0.
func optInt(v any) (int64, bool) {
	if v == nil {
		return 0, true
	}
	n, ok := v.(json.Number)
	if !ok {
		return 0, false
	}
	i, err := n.Int64()
	if err != nil {
		f, ferr := n.Float64()
		if ferr != nil || f < 0 {
			return 0, false
		}
		return int64(f), true
	}
	return i, i >= 0
}

// audiences reads aud: a string or a list of strings.
func audiences(v any) ([]string, bool) {
	switch v := v.(type) {
	case nil:
		return nil, true
	case string:
		return []string{v}, true
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, false
			}
			out = append(out, s)
		}
		return out, true
	}
	return nil, false
}

// audienceAllowed: any of the token's audiences is one of want, both compared without an
// http:// or https:// scheme and a trailing slash (jwt_verify_lib check_audience.cc).
func audienceAllowed(want, got []string) bool {
	for _, g := range got {
		for _, w := range want {
			if sanitizeAudience(g) == sanitizeAudience(w) {
				return true
			}
		}
	}
	return false
}

func sanitizeAudience(a string) string {
	a = strings.TrimPrefix(strings.TrimPrefix(a, "http://"), "https://")
	return strings.TrimSuffix(a, "/")
}

// splitSpaced is claims with each named top-level string claim turned into the list of its
// space-separated words (Envoy's normalize_payload_in_metadata space_delimited_claims), for
// policies; claims itself stays as sent, for outputClaimToHeaders.
func splitSpaced(claims map[string]any, names []string) map[string]any {
	out, cloned := claims, false
	for _, n := range names {
		if s, ok := claims[n].(string); ok {
			if !cloned {
				out, cloned = maps.Clone(claims), true
			}
			var words []any
			for _, w := range strings.Fields(s) {
				words = append(words, w)
			}
			out[n] = words
		}
	}
	return out
}

// claimHeader is the value written for outputClaimToHeaders, as Envoy's addJWTClaimToHeader:
// the claim at a dotted path ("nested.key"); a string as it is, a number or boolean as written,
// a list or an object as its JSON, base64-encoded; "" (nothing written) for an absent claim or
// an empty string.
func claimHeader(claims map[string]any, path string) string {
	var v any = claims
	for _, name := range strings.Split(path, ".") {
		m, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		v = m[name]
	}
	switch v := v.(type) {
	case string:
		return v
	case json.Number:
		return v.String()
	case bool:
		if v {
			return "true"
		}
		return "false"
	case []any, map[string]any:
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return base64.StdEncoding.EncodeToString(b)
	}
	return ""
}
