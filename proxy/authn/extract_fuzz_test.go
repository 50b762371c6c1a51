package authn

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	secv1beta1 "istio.io/api/security/v1beta1"
)

// Token extraction never panics; a token found is a non-empty part of what was sent,
// each token at most once. The claim path of outputClaimToHeaders never panics either.
func FuzzExtract(f *testing.F) {
	f.Add("Bearer abc.def.ghi", "Bearer ", "access_token=x.y.z", "session=a.b.c", "nested.key")
	f.Add("bearer  tok", "", "token=&token=t", "", "")
	f.Add("Value x", "Value ", "%zz", "=;;", "..")
	f.Fuzz(func(t *testing.T, value, prefix, rawQuery, cookie, claimPath string) {
		h := http.Header{}
		h.Set("Authorization", value)
		h.Set("X-Jwt", value)
		query, _ := url.ParseQuery(rawQuery)
		r := &http.Request{Header: http.Header{"Cookie": {cookie}}}
		cookies := func(name string) string {
			c, err := r.Cookie(name)
			if err != nil {
				return ""
			}
			return c.Value
		}
		locs := append(locations(&secv1beta1.JWTRule{}), location{header: "X-Jwt", prefix: prefix}, location{param: "token"}, location{cookie: "session"})
		seen := map[string]bool{}
		for _, tok := range extract(locs, h, query, cookies) {
			if tok.raw == "" || seen[tok.raw] {
				t.Fatalf("token %q empty or repeated", tok.raw)
			}
			seen[tok.raw] = true
			if tok.at.header != "" && !strings.Contains(value, tok.raw) {
				t.Fatalf("header token %q not a part of %q", tok.raw, value)
			}
		}
		claimHeader(map[string]any{"nested": map[string]any{"key": []any{"a", 1}}}, claimPath)
	})
}
