package authn

import (
	"net/http"
	"slices"
	"strings"

	secv1beta1 "istio.io/api/security/v1beta1"
)

// location is where a rule looks for its token (Envoy's extractor.cc).
type location struct {
	header, prefix string // a header, and the prefix its value carries before the token
	param          string // or a query parameter
	cookie         string // or a cookie
}

// token is one token found, and where.
type token struct {
	raw string
	at  location
}

// locations are a rule's fromHeaders, fromParams and fromCookies; none given means Envoy's
// default: the Authorization header with "Bearer ", and the access_token parameter. They are in
// Envoy's extractor order (extractor.cc): headers by name and prefix, then parameters, then
// cookies, each sorted.
func locations(r *secv1beta1.JWTRule) []location {
	var headers, params, cookies []location
	for _, h := range r.GetFromHeaders() {
		headers = append(headers, location{header: http.CanonicalHeaderKey(h.GetName()), prefix: h.GetPrefix()})
	}
	for _, p := range r.GetFromParams() {
		params = append(params, location{param: p})
	}
	for _, c := range r.GetFromCookies() {
		cookies = append(cookies, location{cookie: c})
	}
	if len(headers)+len(params)+len(cookies) == 0 {
		return []location{{header: "Authorization", prefix: "Bearer "}, {param: "access_token"}}
	}
	slices.SortFunc(headers, func(a, b location) int {
		return strings.Compare(strings.ToLower(a.header)+a.prefix, strings.ToLower(b.header)+b.prefix)
	})
	slices.SortFunc(params, func(a, b location) int { return strings.Compare(a.param, b.param) })
	slices.SortFunc(cookies, func(a, b location) int { return strings.Compare(a.cookie, b.cookie) })
	return slices.Concat(headers, params, cookies)
}

// extract lists the tokens at locs, each token once (Envoy keys them by value). header is the
// request's headers, query its parsed query (nil when it has none).
func extract(locs []location, header http.Header, query map[string][]string, cookies func(string) string) []token {
	var out []token
	add := func(raw string, at location) {
		if raw == "" {
			return
		}
		for _, t := range out {
			if t.raw == raw {
				return
			}
		}
		out = append(out, token{raw: raw, at: at})
	}
	for _, l := range locs {
		switch {
		case l.header != "":
			if vs := header.Values(l.header); len(vs) > 0 {
				add(headerToken(strings.Join(vs, ","), l.prefix), l) // Envoy joins repeated headers
			}
		case l.param != "":
			if v := query[l.param]; len(v) > 0 {
				add(v[0], l)
			}
		case l.cookie != "":
			add(cookies(l.cookie), l)
		}
	}
	return out
}

// headerToken is the token in a header value as Envoy's extractor finds it: without a prefix,
// the whole value; with one, the prefix is looked for anywhere in the value (case-sensitively:
// "bearer " is not "Bearer "; "" when absent), and the token is the run of base64url characters
// and dots that follows it (the whole value if there is none).
func headerToken(v, prefix string) string {
	if prefix == "" {
		return v
	}
	i := strings.Index(v, prefix)
	if i < 0 {
		return ""
	}
	rest := v[i+len(prefix):]
	// Bytewise: a token's characters are ASCII, and no byte of a non-ASCII UTF-8 rune is one.
	start := 0
	for start < len(rest) && !jwtChar(rest[start]) {
		start++
	}
	if start == len(rest) {
		return v
	}
	rest = rest[start:]
	end := 0
	for end < len(rest) && jwtChar(rest[end]) {
		end++
	}
	return rest[:end]
}

// jwtChar: base64url's alphabet (RFC 4648 §5) and the dot.
func jwtChar(r byte) bool {
	return 'A' <= r && r <= 'Z' || 'a' <= r && r <= 'z' || '0' <= r && r <= '9' || r == '-' || r == '_' || r == '.'
}
