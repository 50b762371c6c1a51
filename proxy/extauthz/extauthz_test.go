package extauthz

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"

	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
)

func grpcProv(name, service string, port uint32) *meshv1alpha1.MeshConfig_ExtensionProvider {
	return &meshv1alpha1.MeshConfig_ExtensionProvider{Name: name, Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc{
		EnvoyExtAuthzGrpc: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider{Service: service, Port: port}}}
}

func httpProv(name string, p *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider) *meshv1alpha1.MeshConfig_ExtensionProvider {
	return &meshv1alpha1.MeshConfig_ExtensionProvider{Name: name, Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp{EnvoyExtAuthzHttp: p}}
}

// Update keeps the client of an unchanged provider, replaces a changed one, drops a removed one,
// and leaves out (naming why) invalid and duplicate ones; other provider kinds are skipped.
func TestRegistryUpdate(t *testing.T) {
	r := &Registry{}
	defer r.Close()
	if err := r.Update([]*meshv1alpha1.MeshConfig_ExtensionProvider{grpcProv("a", "a.svc", 1), grpcProv("b", "b.svc", 2),
		{Name: "z", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_Zipkin{}}}); err != nil {
		t.Fatal(err)
	}
	a1, _ := r.Checker("a")
	b1, _ := r.Checker("b")
	if a1 == nil || b1 == nil || !a1.Streams() {
		t.Fatalf("checkers: %v %v", a1, b1)
	}
	err := r.Update([]*meshv1alpha1.MeshConfig_ExtensionProvider{grpcProv("a", "a.svc", 1), grpcProv("b", "b.svc", 3), grpcProv("c", "c.svc", 0),
		grpcProv("d", "d.svc", 1), grpcProv("d", "d2.svc", 1)})
	want := `extauthz: provider "c": port must be in 1..65535, got 0` + "\n" + `extauthz: provider "d" is defined 2 times (istiod: names must be unique)`
	if err == nil || err.Error() != want {
		t.Fatalf("got  %v\nwant %s", err, want)
	}
	if a2, _ := r.Checker("a"); a2 != a1 {
		t.Error("an unchanged provider got a new client")
	}
	if b2, _ := r.Checker("b"); b2 == b1 || b2 == nil {
		t.Error("a changed provider kept its old client")
	}
	for name, want := range map[string]string{
		"c": `extauthz: provider "c": port must be in 1..65535, got 0`,
		"d": `extauthz: provider "d" is defined 2 times (istiod: names must be unique)`,
		"z": `extauthz: no provider "z" among`,
	} {
		if c, err := r.Checker(name); c != nil || err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("%s: %v %v, want %s", name, c, err, want)
		}
	}
	var none *Registry
	if _, err := none.Checker("a"); err == nil {
		t.Error("a nil registry has a checker")
	}
}

func TestMatcher(t *testing.T) {
	m := newMatcher([]string{"x-ext-*", "*-token", "Cookie"})
	for name, want := range map[string]bool{"X-Ext-Authz": true, "x-ext-": true, "Auth-Token": true, "cookie": true, "x-other": false, "Cookies": false} {
		if m.match(name) != want {
			t.Errorf("match(%q) = %v, want %v", name, !want, want)
		}
	}
}

// Envoy's HTTP service on a denial: without headersToDownstreamOnDeny every header but Host
// reaches the client; a body over maxRequestBytes without allowPartialMessage is 413; an
// unreachable provider is a failed check answered statusOnError.
func TestHTTPChecker(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-A", "1")
		w.Header().Set("Location", "/login")
		w.WriteHeader(http.StatusFound)
	})}
	go srv.Serve(l)
	defer srv.Close()
	port := uint32(l.Addr().(*net.TCPAddr).Port)
	check := func(p *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider, body string) Result {
		c, err := NewChecker(httpProv("h", p), Config{})
		if err != nil {
			t.Fatal(err)
		}
		defer closeChecker(c)
		r, _ := http.NewRequest("POST", "http://web/x", strings.NewReader(body))
		res := c.Check(context.Background(), &Request{HTTP: r})
		if b, _ := io.ReadAll(r.Body); string(b) != body {
			t.Errorf("the request body after the check: %q, want %q", b, body)
		}
		return res
	}
	res := check(&meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{Service: "127.0.0.1", Port: port}, "")
	if res.Allow || res.Status != 302 || res.Header.Get("X-A") != "1" || res.Header.Get("Location") != "/login" {
		t.Errorf("denial: %+v", res)
	}
	res = check(&meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{Service: "127.0.0.1", Port: port,
		HeadersToDownstreamOnDeny: []string{"x-b"}}, "")
	if res.Header.Get("X-A") != "" || res.Header.Get("Location") != "/login" {
		t.Errorf("headersToDownstreamOnDeny: %v (Location is always kept, X-A not listed)", res.Header)
	}
	res = check(&meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{Service: "127.0.0.1", Port: port,
		IncludeRequestBodyInCheck: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationRequestBody{MaxRequestBytes: 4}}, "too long")
	if res.Allow || res.Status != 413 {
		t.Errorf("body over maxRequestBytes: %+v", res)
	}
	srv.Close()
	res = check(&meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{Service: "127.0.0.1", Port: port, StatusOnError: "503"}, "")
	if res.Allow || res.Status != 503 || !errors.Is(res.Err, ErrCheck) {
		t.Errorf("unreachable: %+v", res)
	}
}

type failingReader struct{ err error }

func (r failingReader) Read([]byte) (int, error) { return 0, r.err }

// readBody buffers what Envoy's with_request_body buffers, and refuses what it refuses, without
// the provider: upgrades and bodiless requests are not buffered; a Content-Length over the limit
// is 413 before a byte is read; a body that cannot be read is 400, one past its deadline 408.
func TestReadBody(t *testing.T) {
	settings := func(max uint32, partial bool) *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationRequestBody {
		return &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationRequestBody{MaxRequestBytes: max, AllowPartialMessage: partial}
	}
	req := func(method string, body io.Reader, length int64, hdr ...string) *http.Request {
		r, _ := http.NewRequest(method, "http://web/x", body)
		r.ContentLength = length
		for i := 0; i+1 < len(hdr); i += 2 {
			r.Header.Set(hdr[i], hdr[i+1])
		}
		return r
	}
	never := failingReader{errors.New("read, but must not be")}
	for _, tc := range []struct {
		name    string
		c       *Checker
		r       *http.Request
		body    string // "-": none buffered
		partial bool
		status  int // a refusal
	}{
		{"no settings", &Checker{}, req("POST", never, 5), "-", false, 0},
		{"no body", &Checker{body: settings(4, false)}, req("GET", nil, 0), "-", false, 0},
		{"websocket upgrade", &Checker{body: settings(4, false)}, req("GET", never, 5, "Connection", "Upgrade", "Upgrade", "websocket"), "-", false, 0},
		{"CONNECT", &Checker{body: settings(4, false)}, req("CONNECT", never, -1), "-", false, 0},
		{"whole", &Checker{body: settings(4, false)}, req("POST", strings.NewReader("abcd"), -1), "abcd", false, 0},
		{"partial", &Checker{body: settings(4, true)}, req("POST", strings.NewReader("abcdef"), 6), "abcd", true, 0},
		{"Content-Length over: 413 unread", &Checker{body: settings(4, false)}, req("POST", never, 5), "-", false, 413},
		{"chunked over: 413", &Checker{body: settings(4, false)}, req("POST", strings.NewReader("abcdef"), -1), "-", false, 413},
		{"unreadable: 400", &Checker{body: settings(4, false)}, req("POST", failingReader{io.ErrUnexpectedEOF}, -1), "-", false, 400},
		{"past the deadline: 408", &Checker{body: settings(4, false)}, req("POST", failingReader{os.ErrDeadlineExceeded}, -1), "-", false, 408},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, refused := tc.c.readBody(&Request{HTTP: tc.r})
			switch {
			case tc.status != 0:
				if refused == nil || refused.Status != tc.status || !refused.Local || refused.Allow {
					t.Fatalf("refusal %+v, want a local %d", refused, tc.status)
				}
			case refused != nil:
				t.Fatalf("refused: %+v", refused)
			case tc.body == "-":
				if b != nil {
					t.Fatalf("buffered %q", b.data)
				}
			case b == nil || string(b.data) != tc.body || b.partial != tc.partial:
				t.Fatalf("buffered %+v, want %q partial %v", b, tc.body, tc.partial)
			}
		})
	}
}

// Envoy's sanitizeUtf8String: each byte not part of valid UTF-8 becomes '!'.
func TestValidUTF8(t *testing.T) {
	for in, want := range map[string]string{"ok": "ok", "\xff\xfeok\xc3": "!!ok!", "é\xe2\x82": "é!!", "日本": "日本"} {
		if got := validUTF8(in); got != want {
			t.Errorf("validUTF8(%q) = %q, want %q", in, got, want)
		}
	}
}
