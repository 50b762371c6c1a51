package authz

import (
	"strings"
	"testing"
)

// ClaimPath never panics, and what it accepts is a non-empty list of non-empty names that
// rebuilds the key.
func FuzzClaimPath(f *testing.F) {
	for _, s := range []string{"request.auth.claims[groups]", "request.auth.claims[a][b]", "request.auth.claims[a.b]", "request.auth.claims[", "request.auth.claims[]", "request.auth.claims[a]x", "request.auth.claims"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		names, ok := ClaimPath(key)
		if !ok {
			return
		}
		if len(names) == 0 {
			t.Fatalf("%q: accepted with no names", key)
		}
		rebuilt := "request.auth.claims"
		for _, n := range names {
			if n == "" || strings.ContainsAny(n, "[]") {
				t.Fatalf("%q: name %q", key, n)
			}
			rebuilt += "[" + n + "]"
		}
		if rebuilt != key {
			t.Fatalf("%q rebuilt as %q", key, rebuilt)
		}
		ClaimStrings(map[string]any{names[0]: []any{"x", 1}}, names)
	})
}

// istiod's requestPrincipals patterns against iss and sub one by one (generator.go).
func TestRequestPrincipal(t *testing.T) {
	c := func(iss, sub string) map[string]any { return map[string]any{"iss": iss, "sub": sub} }
	for _, tc := range []struct {
		value  string
		claims map[string]any
		want   bool
	}{
		{"*", c("i", "s"), true},
		{"*", c("i", ""), false},
		{"*", map[string]any{"iss": "i"}, false},
		{"https://accounts.example.com/alice", c("https://accounts.example.com", "alice"), true},
		{"https://accounts.example.com/alice", c("https://accounts.example.com/alice", ""), false},
		{"iss/*", c("iss", "anyone"), true},
		{"iss/*", c("iss", ""), false},
		{"iss/a*", c("iss", "alice"), true},
		{"iss/a*", c("other", "alice"), false},
		{"*/alice", c("any", "alice"), true},
		{"*/alice", c("x", "y/alice"), false}, // a suffix of "iss/sub" is not enough
		{"*.com/alice", c("https://example.com", "alice"), true},
		{"*ice", c("whoever", "alice"), true},
		{"http*", c("https://x", "s"), true},
		{"iss", c("iss", ""), true},
		{"iss", map[string]any{"iss": "iss"}, false}, // no sub claim: nothing to match
	} {
		if got := RequestPrincipal(tc.value, tc.claims); got != tc.want {
			t.Errorf("%q against %v: %v, want %v", tc.value, tc.claims, got, tc.want)
		}
	}
}
