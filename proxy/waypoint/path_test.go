package waypoint

import (
	"strings"
	"testing"
)

func TestNormalizePath(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"/", "/"},
		{"/a/b", "/a/b"},
		{"/a/./b", "/a/b"},
		{"/a/../admin", "/admin"},
		{"/../../admin", "/admin"},
		{"/a/b/..", "/a/"},
		{"/a/.", "/a/"},
		{"/%2e%2e/admin", "/admin"},
		{"/%2E/admin", "/admin"},
		{"/%61dmin", "/admin"},
		{"/a%2fb", "/a%2Fb"},
		{"/a%2Fb/../c", "/c"},
		{`/a\..\admin`, "/admin"},
		{"//double//slash", "//double//slash"},
		{"/v1.2/x..y/.z", "/v1.2/x..y/.z"},
		{"/q%20s", "/q%20s"},
	} {
		got, ok := normalizePath(c.in)
		if !ok || got != c.want {
			t.Errorf("normalizePath(%q) = %q, %v; want %q", c.in, got, ok, c.want)
		}
	}
	for _, bad := range []string{"", "*", "a/b", "/%", "/%2", "/%zz", "/a b", "/\x00"} {
		if got, ok := normalizePath(bad); ok {
			t.Errorf("normalizePath(%q) = %q, want refusal", bad, got)
		}
	}
}

// The normalized path is stable (normalizing again changes nothing), absolute, and free of dot
// segments: what a policy judged is what the application gets.
func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/", "/a/../b", "/%2e%2e/%2F", `\x\..\y`, "/./.", "//a//..//"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		got, ok := normalizePath(in)
		if !ok {
			return
		}
		if !strings.HasPrefix(got, "/") {
			t.Fatalf("%q -> %q: not absolute", in, got)
		}
		again, ok := normalizePath(got)
		if !ok || again != got {
			t.Fatalf("%q -> %q -> %q, %v: not stable", in, got, again, ok)
		}
		for _, seg := range strings.Split(got, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("%q -> %q: dot segment left", in, got)
			}
		}
	})
}
