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
