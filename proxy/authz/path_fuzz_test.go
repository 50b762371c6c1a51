package authz

import (
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"
)

// templateRegexp is the regular expression Envoy's uri_template library builds for a template
// (literal text quoted, * as one or more path characters, ** as zero or more with "/"): the
// reference the hand-written matcher is fuzzed against.
func templateRegexp(template string) *regexp.Regexp {
	const pchar = `[a-zA-Z0-9\-._~%!$&'()+,;:@=]`
	var b strings.Builder
	b.WriteString("^")
	for rest := template; rest != ""; {
		switch {
		case strings.HasPrefix(rest, "{**}"):
			b.WriteString(`(?:` + pchar + `|/)*`)
			rest = rest[4:]
		case strings.HasPrefix(rest, "{*}"):
			b.WriteString(pchar + `+`)
			rest = rest[3:]
		default:
			_, n := utf8.DecodeRuneInString(rest)
			b.WriteString(regexp.QuoteMeta(rest[:n]))
			rest = rest[n:]
		}
	}
	b.WriteString("$")
	return regexp.MustCompile(b.String())
}

func FuzzPathTemplate(f *testing.F) {
	for _, s := range [][2]string{{"/store/{**}/cart", "/store/a/b/cart"}, {"/foo/{*}/bar/{**}", "/foo/x/bar/"},
		{"/a/{*}{*}/b", "/a/xy/b"}, {"/{**}/{**}", "//"}, {"/x{*", "/x{*"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, template, path string) {
		// The reference works on UTF-8; the matcher on bytes, which agree on valid text.
		if !strings.Contains(template, "{*") || len(template) > 64 || len(path) > 256 || !utf8.ValidString(template) || !utf8.ValidString(path) {
			return
		}
		if got, want := matchPath(template, path), templateRegexp(template).MatchString(path); got != want {
			t.Fatalf("%q on %q: %v, the reference says %v", template, path, got, want)
		}
	})
}
