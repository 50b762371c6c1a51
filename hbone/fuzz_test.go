package hbone

import (
	"strings"
	"testing"

	"golang.org/x/net/http2/hpack"
)

// FuzzParseTarget: never panics; whatever parses renders back to an authority that parses to the
// same target.
func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"10.0.0.1:80", "[fd00::1]:15008", "echo.default.svc.cluster.local:80", "a:1",
		"10.0.0.1:0", ":80", "[::1]", "host:+80", "1.2.3:80", "[::ffff:1.2.3.4]:80", "x..y:80", "A-B.c:65535"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, authority string) {
		tg, err := ParseTarget(authority)
		if err != nil {
			if !strings.HasPrefix(err.Error(), ErrBadAuthority.Error()) {
				t.Fatalf("error %q lacks the sentinel", err)
			}
			return
		}
		if tg.Port == 0 || tg.IsAddr() == (tg.Host != "") {
			t.Fatalf("%q parsed to inconsistent %+v", authority, tg)
		}
		again, err := ParseTarget(tg.String())
		if err != nil || again != tg {
			t.Fatalf("%q -> %q -> %+v, %v", authority, tg.String(), again, err)
		}
	})
}

// FuzzParseForwarded: never panics; what parses formats to text that parses to the same elements.
func FuzzParseForwarded(f *testing.F) {
	for _, s := range []string{`for="10.0.0.1:3456"`, `for="10.0.0.1:3456";host=echo.default.svc.cluster.local`,
		`for=192.0.2.43, for="[2001:db8:cafe::17]:4711"`, `for=unknown;proto=https;by=_hidden`, `for="a\"b"`, `;`, `for=`, `for="x`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		els, err := ParseForwarded(v)
		if err != nil {
			return
		}
		again, err := ParseForwarded(FormatForwarded(els...))
		if err != nil || len(again) != len(els) {
			t.Fatalf("%q -> %q -> %v, %v", v, FormatForwarded(els...), again, err)
		}
		for i := range els {
			if els[i] != again[i] {
				t.Fatalf("%q: element %d %+v became %+v", v, i, els[i], again[i])
			}
		}
		for _, e := range els {
			e.ForAddr()
		}
	})
}

// FuzzParseRequest decodes fuzzed header fields (name/value pairs split on NUL and newline) as a
// CONNECT: it never panics, and accepts only CONNECTs with a valid authority.
func FuzzParseRequest(f *testing.F) {
	f.Add(":method\x00CONNECT\n:authority\x0010.0.0.1:80\nforwarded\x00for=\"1.2.3.4:5\"\nbaggage\x00k=v")
	f.Add(":method\x00GET\n:authority\x0010.0.0.1:80")
	f.Add(":method\x00CONNECT\n:authority\x00x:1\n:path\x00/")
	f.Fuzz(func(t *testing.T, block string) {
		var fields []hpack.HeaderField
		for line := range strings.SplitSeq(block, "\n") {
			name, value, _ := strings.Cut(line, "\x00")
			fields = append(fields, hpack.HeaderField{Name: name, Value: value})
		}
		r, status, err := parseRequest(fields)
		if (err == nil) != (status == 200) || (err == nil) != (r != nil) {
			t.Fatalf("status %d with err %v and request %v", status, err, r)
		}
		if r != nil {
			if _, err := ParseTarget(r.Target.String()); err != nil {
				t.Fatalf("accepted a bad target: %v", err)
			}
			r.OriginalSource()
		}
	})
}
