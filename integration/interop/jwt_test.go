package interop

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	secv1beta1 "istio.io/api/security/v1beta1"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/schema/gvk"
	"istio.io/istio/pkg/config/validation"
	istiohbone "istio.io/istio/pkg/hbone"
	"istio.io/istio/tests/common/jwt"
	"sigs.k8s.io/yaml"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// jwtBed: service web (10.96.0.40:80, declared HTTP) with one pod behind Istio's Go HBONE
// server, whose app answers with the headers it received as JSON; detour's waypoint in front,
// its policies and RequestAuthentications swapped per scenario; a real JWKS endpoint serving
// Istio's test key set (tests/common/jwt) and the sample one (security/tools/jwt/samples); Istio's
// Go HBONE client as the source (ztunnel's role).
type jwtBed struct {
	dialer  istiohbone.Dialer
	engine  atomic.Pointer[authz.Engine]
	authn   atomic.Pointer[authn.Authenticator]
	keys    *authn.Keys
	jwksURL string // Istio's test JWKS; /samples is the sample one; /missing answers 404
}

func newJWTBed(t *testing.T, samplesJWKS string) *jwtBed {
	it.QuietIstio()
	p := it.NewPKI(t)
	quiet := slog.New(slog.DiscardHandler)
	issue := func(id string) identity.Source { return p.Source(t, id) }
	hbonePort := it.FreePort(t, "127.0.0.2")
	hl, err := net.Listen("tcp", net.JoinHostPort("127.0.0.2", strconv.Itoa(hbonePort)))
	if err != nil {
		t.Skipf("port %d not free on 127.0.0.2: %v", hbonePort, err)
	}
	it.IstioServerOn(t, hl, identity.ServerTLS(issue("spiffe://cluster.local/ns/demo/sa/web"), nil))
	app := headersApp(t)
	jwksURL := jwksServer(t, samplesJWKS)

	table, err := route.NewTable([]*route.Service{{Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local",
		VIPs:      []netip.Addr{netip.MustParseAddr("10.96.0.40")},
		Ports:     []route.Port{{Name: "http", Port: 80, TargetPort: uint16(app.Addr().(*net.TCPAddr).Port)}},
		Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("127.0.0.2"), Ready: true, ServiceAccount: "web"}}}})
	if err != nil {
		t.Fatal(err)
	}
	b := &jwtBed{keys: &authn.Keys{Logger: quiet}, jwksURL: jwksURL}
	onward := &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { onward.Close() })
	wp := it.DetourServer(t, p, &waypoint.Handler{Routes: func() *route.Table { return table }, Identity: issue(it.ServerID),
		Dialer: onward, HBONEPort: uint16(hbonePort), Logger: quiet,
		Policies: func() *authz.Engine { return b.engine.Load() }, Authn: func() *authn.Authenticator { return b.authn.Load() }})
	b.dialer = it.IstioDialer(p, wp.Addr().String())
	return b
}

// headersApp serves HTTP/1.1 and cleartext HTTP/2 on 127.0.0.2, answering every request with
// the headers it received, as JSON.
func headersApp(t *testing.T) net.Listener {
	app := it.ListenAt(t, "127.0.0.2:0")
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	as := &http.Server{Protocols: &protos, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(r.Header)
	})}
	go as.Serve(app)
	t.Cleanup(func() { as.Close() })
	return app
}

// jwksServer serves Istio's test key set (tests/common/jwt) at /jwks and the sample one at
// /samples; it returns its URL.
func jwksServer(t *testing.T, samplesJWKS string) string {
	jwks := http.NewServeMux()
	jwks.HandleFunc("/jwks", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, jwt.JwksJSON) })
	jwks.HandleFunc("/samples", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, samplesJWKS) })
	js := httptest.NewServer(jwks)
	t.Cleanup(js.Close)
	return js.URL
}

// apply installs the objects of a YAML stream (RequestAuthentication and AuthorizationPolicy
// in namespace demo), each spec decoded strictly; {{JWKS}} is the test JWKS address.
func (b *jwtBed) apply(t *testing.T, docs string) {
	t.Helper()
	wp := authz.Waypoint{Namespace: "demo", Gateway: "detour"}
	var ras []*authn.Policy
	var aps []*authz.Policy
	for _, o := range decodeObjects(t, docs, b.jwksURL) {
		switch spec := o.decoded.(type) {
		case *secv1beta1.RequestAuthentication:
			ras = append(ras, &authn.Policy{Namespace: o.Namespace, Name: o.Name, Spec: spec})
		case *secv1beta1.AuthorizationPolicy:
			aps = append(aps, &authz.Policy{Namespace: o.Namespace, Name: o.Name, Spec: spec, DryRun: authz.DryRun(o.Annotations)})
		}
	}
	b.engine.Store(authz.New(wp, aps))
	b.authn.Store(authn.New(wp, ras, b.keys, nil))
}

// object is one RequestAuthentication or AuthorizationPolicy of a case's YAML stream.
type object struct {
	Kind, Name, Namespace string
	Annotations           map[string]string
	Spec                  json.RawMessage // as written
	decoded               config.Spec     // decoded strictly, and accepted by istiod's validation
}

// decodeObjects reads a YAML stream of objects (namespace demo unless set); {{JWKS}} becomes
// jwksURL. Every spec is decoded strictly and validated as istiod's webhook would.
func decodeObjects(t *testing.T, docs, jwksURL string) []object {
	t.Helper()
	var out []object
	for _, doc := range strings.Split(strings.ReplaceAll(docs, "{{JWKS}}", jwksURL), "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var obj struct {
			Kind     string
			Metadata struct {
				Name, Namespace string
				Annotations     map[string]string
			}
			Spec json.RawMessage
		}
		j, err := yaml.YAMLToJSON([]byte(doc))
		if err == nil {
			err = json.Unmarshal(j, &obj)
		}
		if err != nil {
			t.Fatalf("%v in\n%s", err, doc)
		}
		o := object{Kind: obj.Kind, Name: obj.Metadata.Name, Namespace: obj.Metadata.Namespace, Annotations: obj.Metadata.Annotations, Spec: obj.Spec}
		if o.Namespace == "" {
			o.Namespace = "demo"
		}
		switch obj.Kind {
		case "RequestAuthentication":
			spec := &secv1beta1.RequestAuthentication{}
			if err := protojson.Unmarshal(obj.Spec, spec); err != nil {
				t.Fatalf("%s: %v", o.Name, err)
			}
			istioValidates(t, validation.ValidateRequestAuthentication, gvk.RequestAuthentication, o.Namespace, o.Name, spec)
			o.decoded = spec
		case "AuthorizationPolicy":
			spec := &secv1beta1.AuthorizationPolicy{}
			if err := protojson.Unmarshal(obj.Spec, spec); err != nil {
				t.Fatalf("%s: %v", o.Name, err)
			}
			istioValidates(t, validation.ValidateAuthorizationPolicy, gvk.AuthorizationPolicy, o.Namespace, o.Name, spec)
			o.decoded = spec
		default:
			t.Fatalf("kind %q", obj.Kind)
		}
		out = append(out, o)
	}
	return out
}

// istioValidates runs istiod's own validation (pkg/config/validation, what its webhook runs) on
// an object: every case's objects are ones istiod accepts.
func istioValidates(t *testing.T, validate validation.ValidateFunc, kind config.GroupVersionKind, ns, name string, spec config.Spec) {
	t.Helper()
	if _, err := validate(config.Config{Meta: config.Meta{GroupVersionKind: kind, Namespace: ns, Name: name}, Spec: spec}); err != nil {
		t.Fatalf("istiod refuses %s %s/%s: %v", kind.Kind, ns, name, err)
	}
}

// client sends requests over Istio HBONE streams; h2 selects HTTP/2 prior knowledge.
func (b *jwtBed) client(t *testing.T, h2 bool) *http.Client {
	var p http.Protocols
	if h2 {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: &p, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return b.dialer.DialContext(ctx, "tcp", addr)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// jwtCase is one request and what Envoy's waypoint answers it.
type jwtCase struct {
	name   string
	method string   // default GET
	path   string   // default /
	header []string // name, value pairs
	from   string   // the source's SPIFFE ID; default it.ClientID
	host   string   // the Host header; default the URL's, 10.96.0.40:port
	port   int      // web's port: 80 declared HTTP (default), 81 undeclared (sniffed)
	tcp    bool     // an opaque stream to port 82 instead of a request: code 200 or 403
	code   int
	body   string            // the local reply's body, for 401 and 403
	seen   map[string]string // request headers the app must have got ("" = absent)
}

// jwtScenario is a set of objects, from an Istio source, and the cases run against it.
type jwtScenario struct {
	source  string // the Istio doc, test or testdata the objects and cases come from
	objects string
	cases   []jwtCase
}

func bearer(tok string) []string { return []string{"Authorization", "Bearer " + tok} }

func payload(tok string) string { return strings.Split(tok, ".")[1] }

// samples reads security/tools/jwt/samples from the istio.io/istio module in use.
func samples(t *testing.T) (jwks, demo, groupsScope string) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	if err != nil {
		t.Fatalf("go list istio.io/istio: %v", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "security", "tools", "jwt", "samples")
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	return read("jwks.json"), read("demo.jwt"), read("groups-scope.jwt")
}

const (
	rbacDenied = "RBAC: access denied"
	toWeb      = "  targetRefs: [{kind: Service, name: web}]\n"
)

// An AuthorizationPolicy + RequestAuthentication table from Istio's own tests and docs, run end
// to end through detour's waypoint with Istio's HBONE client, over HTTP/1.1 and HTTP/2. Istio's
// objects select workloads; at a waypoint they bind by targetRefs, so each names Service web.
func TestJWTThroughDetourWaypoint(t *testing.T) {
	samplesJWKS, demo, groupsScope := samples(t)
	b := newJWTBed(t, samplesJWKS)
	for _, sc := range jwtScenarios(demo, groupsScope) {
		b.apply(t, sc.objects)
		for _, h2 := range []bool{false, true} {
			c := b.client(t, h2)
			for _, tc := range sc.cases {
				t.Run(fmt.Sprintf("%s/%s/h2=%v", sc.source, tc.name, h2), func(t *testing.T) {
					checkJWTCase(t, c, tc)
				})
			}
		}
	}
}

func checkJWTCase(t *testing.T, c *http.Client, tc jwtCase) {
	method, path := tc.method, tc.path
	if method == "" {
		method = "GET"
	}
	if path == "" {
		path = "/"
	}
	port := tc.port
	if port == 0 {
		port = 80
	}
	req, err := http.NewRequest(method, fmt.Sprintf("http://10.96.0.40:%d%s", port, path), nil)
	if err != nil {
		t.Fatal(err)
	}
	if tc.host != "" {
		req.Host = tc.host
	}
	for i := 0; i+1 < len(tc.header); i += 2 {
		req.Header.Set(tc.header[i], tc.header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != tc.code {
		t.Fatalf("%d %q, want %d", resp.StatusCode, body, tc.code)
	}
	if tc.code != 200 {
		if tc.body != "" && string(body) != tc.body {
			t.Fatalf("body %q, want %q", body, tc.body)
		}
		return
	}
	var seen http.Header
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(&seen); err != nil {
		t.Fatalf("the app's answer %q: %v", body, err)
	}
	for k, want := range tc.seen {
		if got := seen.Get(k); got != want {
			t.Errorf("the app got %s: %q, want %q", k, got, want)
		}
	}
}
