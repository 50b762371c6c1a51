package authz

import (
	"strings"
)

// JWT is a request's validated token (RequestAuthentication): what requestPrincipals and the
// request.auth.* conditions look at. nil in HTTPRequest.JWT means the request carried none (no
// request principal: not an error).
type JWT struct {
	// Principal is "iss/sub", Istio's request principal, for logs: requestPrincipals and
	// request.auth.principal match the iss and sub claims one by one, as istiod does.
	Principal string
	Audiences []string // aud, a string or a list in the token
	Presenter string   // azp
	// Claims is the token's payload as JSON decodes it (numbers as json.Number); the top-level
	// claims Istio treats as space-delimited (scope, permission, spaceDelimitedClaims) are lists
	// of their space-separated words, as Envoy's normalize_payload_in_metadata.
	Claims map[string]any
}

// jwtField tests a JWT attribute: unknown without HTTP (an opaque stream: Istio's TCP filter
// drops the rule's HTTP-only fields, so an ALLOW cannot match and a DENY ignores it), no match
// without a token, else any of get's strings matching the value (Istio's wildcards).
func jwtField(req *Request, get func(*JWT) []string) func(string) tri {
	return jwtMatch(req, func(j *JWT, v string) bool {
		for _, got := range get(j) {
			if wildcard(v, got) {
				return true
			}
		}
		return false
	})
}

func jwtMatch(req *Request, match func(j *JWT, v string) bool) func(string) tri {
	return func(v string) tri {
		if req.HTTP == nil {
			return unknown
		}
		if req.HTTP.JWT == nil {
			return no
		}
		return boolTri(match(req.HTTP.JWT, v))
	}
}

// requestPrincipals matches requestPrincipals / notRequestPrincipals and request.auth.principal.
func requestPrincipals(req *Request) func(string) tri {
	return jwtMatch(req, func(j *JWT, v string) bool { return RequestPrincipal(v, j.Claims) })
}

// RequestPrincipal is istiod's match of a requestPrincipals value (pilot/pkg/security/authz/model
// generator.go, requestPrincipalGenerator): the value splits at its last "/" into issuer and
// subject, matched against the token's iss and sub claims, each of which must be there. "*" is
// any issuer and subject; "*x/sub" an issuer ending in x; "iss/x*" a subject starting with x;
// without a "/", "*x" is any issuer and a subject ending in x, "x*" an issuer starting with x.
func RequestPrincipal(v string, claims map[string]any) bool {
	iss, okIss := claims["iss"].(string)
	sub, okSub := claims["sub"].(string)
	if !okIss || !okSub {
		return false
	}
	idx := strings.LastIndex(v, "/")
	found := idx >= 0
	wantIss, wantSub := v, ""
	if found {
		wantIss, wantSub = v[:idx], v[idx+1:]
	}
	switch {
	case v == "*":
		return iss != "" && sub != ""
	case strings.HasPrefix(v, "*") && found:
		return (wantIss == "*" && iss != "" || wantIss != "*" && strings.HasSuffix(iss, wantIss[1:])) && sub == wantSub
	case strings.HasPrefix(v, "*"):
		return iss != "" && strings.HasSuffix(sub, v[1:])
	case strings.HasSuffix(v, "*") && found:
		return iss == wantIss && (wantSub == "*" && sub != "" || wantSub != "*" && strings.HasPrefix(sub, wantSub[:len(wantSub)-1]))
	case strings.HasSuffix(v, "*"):
		return strings.HasPrefix(iss, v[:len(v)-1]) && sub != ""
	}
	return iss == wantIss && sub == wantSub
}

// jwtCondition evaluates the request.auth.* keys; ok is false for a key that is not one.
func jwtCondition(key string, values, notValues []string, req *Request) (t tri, ok bool) {
	var get func(*JWT) []string
	switch {
	case key == "request.auth.principal":
		return field(values, notValues, requestPrincipals(req)), true
	case key == "request.auth.audiences":
		get = func(j *JWT) []string { return j.Audiences }
	case key == "request.auth.presenter":
		get = func(j *JWT) []string { return nonEmpty(j.Presenter) }
	case strings.HasPrefix(key, "request.auth.claims"):
		path, valid := ClaimPath(key)
		if !valid {
			return unknown, true // istiod refuses such a key; never match it
		}
		get = func(j *JWT) []string { return ClaimStrings(j.Claims, path) }
	default:
		return no, false
	}
	return field(values, notValues, jwtField(req, get)), true
}

func nonEmpty(s string) []string {
	if s == "" {
		return nil
	}
	return []string{s}
}

// ClaimPath parses "request.auth.claims[a][b]..." into its names, as istiod's
// extractNameInNestedBrackets: at least one, none empty, nothing between or after the brackets.
// A name keeps its dots ("[a.b]" is the claim "a.b").
func ClaimPath(key string) ([]string, bool) {
	rest, ok := strings.CutPrefix(key, "request.auth.claims")
	if !ok || rest == "" {
		return nil, false
	}
	var names []string
	for rest != "" {
		if rest[0] != '[' {
			return nil, false
		}
		end := strings.IndexByte(rest, ']')
		if end < 2 || strings.ContainsAny(rest[1:end], "[") {
			return nil, false
		}
		names = append(names, rest[1:end])
		rest = rest[end+1:]
	}
	return names, true
}

// ClaimStrings is the string claim at path in claims, or the string elements of a list claim
// there: what a claim condition matches (Envoy's metadata string or list matcher; a number, a
// boolean or an object matches nothing).
func ClaimStrings(claims map[string]any, path []string) []string {
	var v any = claims
	for _, name := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[name]
	}
	switch v := v.(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, e := range v {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}
