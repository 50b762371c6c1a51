package httproute

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func corsOf(t *testing.T, c CORS) *CORSAction {
	t.Helper()
	a, err := compileCORS(&c)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Origin matching as the Gateway API's HTTPCORSFilter.allowOrigins says: scheme, host and port
// (the scheme's default when absent), "*" alone for any, a host's leading "*" greedy to the left.
func TestCORSOrigins(t *testing.T) {
	a := corsOf(t, CORS{AllowOrigins: []string{"https://app.example.com", "http://*.dev.example.com", "https://x.test:8443"}})
	for o, want := range map[string]bool{
		"https://app.example.com":     true,
		"https://app.example.com:443": true, // the default port is the same origin
		"https://APP.example.com":     true,
		"http://app.example.com":      false, // another scheme
		"https://app.example.com:444": false,
		"http://a.dev.example.com":    true,
		"http://a.b.dev.example.com":  true, // any number of labels
		"http://dev.example.com":      false,
		"https://a.dev.example.com":   false,
		"https://x.test:8443":         true,
		"https://x.test":              false,
		"null":                        false,
		"":                            false,
	} {
		if got := a.allowed(o); got != want {
			t.Errorf("origin %q: %v, want %v", o, got, want)
		}
	}
	if !corsOf(t, CORS{AllowOrigins: []string{"*"}}).allowed("http://anything.test:1") {
		t.Error(`"*" does not allow every origin`)
	}
	for _, bad := range []string{"example.com", "ftp://x.test", "https://x.test/path"} {
		if _, err := compileCORS(&CORS{AllowOrigins: []string{bad}}); err == nil {
			t.Errorf("allowOrigins %q accepted", bad)
		}
	}
}

func TestCORSPreflight(t *testing.T) {
	yes := true
	preflight := func(a *CORSAction, origin, method, headers string) *httptest.ResponseRecorder {
		r := httptest.NewRequest("OPTIONS", "http://web/x", nil)
		r.Header.Set("Origin", origin)
		if method != "" {
			r.Header.Set("Access-Control-Request-Method", method)
		}
		if headers != "" {
			r.Header.Set("Access-Control-Request-Headers", headers)
		}
		w := httptest.NewRecorder()
		if !a.Preflight(r) {
			t.Fatalf("%s %s not a preflight", origin, method)
		}
		a.Answer(w, r)
		return w
	}
	a := corsOf(t, CORS{AllowOrigins: []string{"https://app.example.com"}, AllowMethods: []string{"GET", "PUT"},
		AllowHeaders: []string{"x-token", "content-type"}, AllowCredentials: &yes})
	w := preflight(a, "https://app.example.com", "PUT", "x-token")
	h := w.Header()
	if w.Code != 200 || h.Get("Access-Control-Allow-Origin") != "https://app.example.com" || h.Get("Access-Control-Allow-Credentials") != "true" ||
		h.Get("Access-Control-Allow-Methods") != "GET,PUT" || h.Get("Access-Control-Allow-Headers") != "x-token,content-type" ||
		h.Get("Access-Control-Max-Age") != "5" {
		t.Errorf("allowed preflight: %d %v", w.Code, h)
	}
	// Not allowed: answered, without the headers (the browser refuses).
	if w := preflight(a, "https://evil.test", "PUT", ""); w.Code != 200 || w.Header().Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("refused preflight: %d %v", w.Code, w.Header())
	}
	// Wildcards echo what was asked (right with credentials too); no Request-Headers, no Allow-Headers.
	age := int32(600)
	any := corsOf(t, CORS{AllowOrigins: []string{"*"}, AllowMethods: []string{"*"}, AllowHeaders: []string{"*"}, MaxAge: &age})
	w = preflight(any, "http://a.test", "DELETE", "")
	if h := w.Header(); h.Get("Access-Control-Allow-Origin") != "http://a.test" || h.Get("Access-Control-Allow-Methods") != "DELETE" ||
		h.Get("Access-Control-Allow-Headers") != "" || h.Get("Access-Control-Max-Age") != "600" {
		t.Errorf("wildcard preflight: %v", h)
	}
	// An OPTIONS without Access-Control-Request-Method is an ordinary request.
	r := httptest.NewRequest("OPTIONS", "http://web/x", nil)
	r.Header.Set("Origin", "https://app.example.com")
	if a.Preflight(r) || (*CORSAction)(nil).Preflight(r) {
		t.Error("an OPTIONS without Access-Control-Request-Method taken for a preflight")
	}
}

// The response to an allowed cross-origin request carries the CORS headers, replacing the
// upstream's own; any other request's response is left alone.
func TestCORSResponse(t *testing.T) {
	a := corsOf(t, CORS{AllowOrigins: []string{"https://app.example.com"}, ExposeHeaders: []string{"x-trace"}})
	h := http.Header{"Access-Control-Allow-Origin": {"*"}}
	a.Apply(h, "https://app.example.com")
	if h.Get("Access-Control-Allow-Origin") != "https://app.example.com" || h.Get("Access-Control-Expose-Headers") != "x-trace" ||
		h.Get("Access-Control-Allow-Credentials") != "" {
		t.Errorf("allowed: %v", h)
	}
	h = http.Header{}
	a.Apply(h, "https://evil.test")
	(*CORSAction)(nil).Apply(h, "https://app.example.com")
	if len(h) != 0 {
		t.Errorf("not allowed, or no filter: %v", h)
	}
}
