package hbone

import (
	"net/http"
	"testing"

	"golang.org/x/net/http2/hpack"
)

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"10.0.0.1:80", "10.0.0.1:80", ""},
		{"[fd00::1]:15008", "[fd00::1]:15008", ""},
		{"Echo.Default.svc.cluster.local:8080", "echo.default.svc.cluster.local:8080", ""},
		{"no-port", "", `hbone: malformed authority "no-port": missing port`},
		{"10.0.0.1:0", "", `hbone: malformed authority "10.0.0.1:0": bad port "0"`},
		{"10.0.0.1:080", "", `hbone: malformed authority "10.0.0.1:080": bad port "080"`},
		{"10.0.0.1:65536", "", `hbone: malformed authority "10.0.0.1:65536": bad port "65536"`},
		{"fd00::1:80", "", `hbone: malformed authority "fd00::1:80": IPv6 literal needs brackets`},
		{"[fe80::1%eth0]:80", "", `hbone: malformed authority "[fe80::1%eth0]:80": bad IPv6 literal`},
		{"[10.0.0.1]:80", "", `hbone: malformed authority "[10.0.0.1]:80": bad IPv6 literal`},
		{"user@host:80", "", `hbone: malformed authority "user@host:80": bad character '@' in host name`},
		{"1.2.3:80", "", `hbone: malformed authority "1.2.3:80": numeric top-level label in "1.2.3"`},
		{":80", "", `hbone: malformed authority ":80": bad host name length 0`},
		{"-a.b:80", "", `hbone: malformed authority "-a.b:80": bad host name label "-a"`},
	} {
		got, err := ParseTarget(tc.in)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%q: got %v, %v; want error %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("%q: got %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestParseRequest(t *testing.T) {
	f := func(kv ...string) []hpack.HeaderField {
		var out []hpack.HeaderField
		for i := 0; i < len(kv); i += 2 {
			out = append(out, hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		fields []hpack.HeaderField
		status int
		err    string
	}{
		{"ok", f(":method", "CONNECT", ":authority", "10.0.0.1:80"), 200, ""},
		{"get", f(":method", "GET", ":authority", "10.0.0.1:80", ":path", "/"), 405, `hbone: method "GET" is not CONNECT`},
		{"path", f(":method", "CONNECT", ":authority", "10.0.0.1:80", ":path", "/"), 400, "hbone: malformed authority: CONNECT with :scheme, :path or :protocol"},
		{"no authority", f(":method", "CONNECT"), 400, `hbone: malformed authority "": missing port`},
	} {
		_, status, err := parseRequest(tc.fields)
		if status != tc.status || (err == nil) != (tc.err == "") || err != nil && err.Error() != tc.err {
			t.Errorf("%s: got %d, %v; want %d, %q", tc.name, status, err, tc.status, tc.err)
		}
	}
	r, _, _ := parseRequest(f(":method", "CONNECT", ":authority", "10.0.0.1:80", "forwarded", `for="10.1.1.1:999";host=svc`, "x-a", "b"))
	if src, ok := r.OriginalSource(); !ok || src.String() != "10.1.1.1:999" || r.Header.Get("X-A") != "b" {
		t.Errorf("got %v %v %v", src, ok, r.Header)
	}
	if r.Header.Get("Forwarded") != "" {
		t.Error("forwarded left in Header")
	}
	_ = http.MethodConnect
}

func TestStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int
	}{
		{ErrBadAuthority, 400}, {ErrForbidden, 403}, {ErrUnavailable, 503}, {&StatusError{Code: 429}, 429},
		{errString("boom"), 502},
	} {
		if got := Status(tc.err); got != tc.want {
			t.Errorf("Status(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

type errString string

func (e errString) Error() string { return string(e) }
