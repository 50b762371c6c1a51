package authn

import (
	"net/http"
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
// default: the Authorization header with "Bearer ", then the access_token parameter.
func locations(r *secv1beta1.JWTRule) []location {
	var out []location
	for _, h := range r.GetFromHeaders() {
		out = append(out, location{header: http.CanonicalHeaderKey(h.GetName()), prefix: h.GetPrefix()})
	}
	for _, p := range r.GetFromParams() {
		out = append(out, location{param: p})
	}
	for _, c := range r.GetFromCookies() {
		out = append(out, location{cookie: c})
	}
	if len(out) == 0 {
		out = []location{{header: "Authorization", prefix: "Bearer "}, {param: "access_token"}}
	}
	return out
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
			add(headerToken(header.Get(l.header), l.prefix), l)
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

// headerToken is the token in a header value after prefix ("" when the value lacks it). The
// default "Bearer " scheme is matched without regard to case (RFC 6750 §2.1), as Envoy does.
func headerToken(v, prefix string) string {
	if prefix == "" {
		return strings.TrimSpace(v)
	}
	if len(v) < len(prefix) {
		return ""
	}
	if v[:len(prefix)] != prefix && !(prefix == "Bearer " && strings.EqualFold(v[:len(prefix)], prefix)) {
		return ""
	}
	return strings.TrimSpace(v[len(prefix):])
}
