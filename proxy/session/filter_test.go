package session

import (
	"net/http"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Every header condition must hold (AND); within one, any of a repeated header's values will do.
func TestMatchHeadersAND(t *testing.T) {
	f := tunnel.Filter{Method: "GET"}.WithHeaders([]tunnel.HeaderMatch{
		{Name: "x-dev", Value: "alice"}, {Name: "x-team", Regex: "^pay"}, {Name: "x-debug"}})
	s, err := New(tunnel.Spec{Mode: Steal, Filter: f}, "web.demo.svc.cluster.local", spiffeid.RequireFromString("spiffe://td/a"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		header http.Header
		want   bool
	}{
		{http.Header{"X-Dev": {"alice"}, "X-Team": {"payments"}, "X-Debug": {""}}, true},
		{http.Header{"X-Dev": {"bob", "alice"}, "X-Team": {"payments"}, "X-Debug": {"1"}}, true},
		{http.Header{"X-Dev": {"alice"}, "X-Team": {"payments"}}, false},
		{http.Header{"X-Dev": {"alice"}, "X-Team": {"search"}, "X-Debug": {"1"}}, false},
		{http.Header{"X-Dev": {"alicia"}, "X-Team": {"payments"}, "X-Debug": {"1"}}, false},
		{http.Header{}, false},
	} {
		r := &http.Request{Method: "GET", Header: tc.header}
		if got := s.Match(r, "/"); got != tc.want {
			t.Errorf("%v: match %v, want %v", tc.header, got, tc.want)
		}
	}
}

func TestCheckFilter(t *testing.T) {
	many := make([]tunnel.HeaderMatch, MaxHeaderConditions+1)
	for i := range many {
		many[i] = tunnel.HeaderMatch{Name: "x-a"}
	}
	for _, tc := range []struct {
		f    tunnel.Filter
		want string
	}{
		{tunnel.Filter{Header: "x-dev", HeaderValue: "a"}, ""},
		{tunnel.Filter{HeaderValue: "a"}, "session: a header value needs a header name"},
		{tunnel.Filter{Header: "x-dev: alice"}, `session: header name "x-dev: alice" is not an HTTP token`},
		{tunnel.Filter{Header: "x", Headers: []tunnel.HeaderMatch{{Name: "y", Value: "1", Regex: "1"}}}, "session: header y: give a header value or a header regex, not both"},
		{tunnel.Filter{Headers: []tunnel.HeaderMatch{{Name: "y", Regex: "("}}}, "session: header regex: error parsing regexp: missing closing ): `(`"},
		{tunnel.Filter{}.WithHeaders(many), "session: 9 header conditions, at most 8"},
		{tunnel.Filter{Path: "[a"}, "session: path regex: error parsing regexp: missing closing ]: `[a`"},
		{tunnel.Filter{Method: "GE T"}, `session: method "GE T" is not an HTTP token`},
	} {
		err := CheckFilter(tc.f)
		if got := errText(err); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.f, got, tc.want)
		}
		if tc.want != "" && !strings.Contains(tc.want, "method") {
			if _, err := New(tunnel.Spec{Mode: Steal, Filter: tc.f}, "h", spiffeid.RequireFromString("spiffe://td/a"), nil); errText(err) != tc.want {
				t.Errorf("New %+v: %v, want %q", tc.f, err, tc.want)
			}
		}
	}
}

// Two steals are disjoint when some header has different exact values in the two.
func TestOverlapsHeaders(t *testing.T) {
	a := tunnel.Filter{}.WithHeaders([]tunnel.HeaderMatch{{Name: "x-team", Regex: "."}, {Name: "x-dev", Value: "alice"}})
	b := tunnel.Filter{Header: "X-Dev", HeaderValue: "bob"}
	c := tunnel.Filter{}.WithHeaders([]tunnel.HeaderMatch{{Name: "x-other", Value: "1"}, {Name: "x-dev", Value: "alice"}})
	if overlaps(a, b) || overlaps(b, a) || !overlaps(a, c) || !overlaps(b, tunnel.Filter{}) {
		t.Fatal("overlaps")
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
