package waypoint_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/extauthz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// The ext_authz servers below decide on the request's x-ext-authz header, as Istio's sample
// (samples/extauthz): "allow" allows, setting x-user upstream and x-authz on the response;
// "slow" never answers; anything else denies with 401, a WWW-Authenticate and a body.

// grpcAuthz implements Envoy's envoy.service.auth.v3.Authorization with go-control-plane.
type grpcAuthz struct {
	authv3.UnimplementedAuthorizationServer
	calls        atomic.Int32
	last         atomic.Pointer[authv3.CheckRequest]
	allowStreams atomic.Bool // an opaque stream (no HTTP attributes) is allowed
}

func (s *grpcAuthz) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	s.calls.Add(1)
	s.last.Store(req)
	hv := func(k, v string) *corev3.HeaderValueOption {
		return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, Value: v}}
	}
	if req.GetAttributes().GetRequest().GetHttp() == nil && s.allowStreams.Load() {
		return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.OK)}}, nil
	}
	switch req.GetAttributes().GetRequest().GetHttp().GetHeaders()["x-ext-authz"] {
	case "allow":
		return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.OK)}, HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
			Headers:              []*corev3.HeaderValueOption{hv("x-user", "alice")},
			ResponseHeadersToAdd: []*corev3.HeaderValueOption{hv("x-authz", "grpc")},
		}}}, nil
	case "slow":
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.PermissionDenied)}, HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
		Status:  &typev3.HttpStatus{Code: typev3.StatusCode_Unauthorized},
		Headers: []*corev3.HeaderValueOption{hv("www-authenticate", `Bearer realm="grpc"`)},
		Body:    "denied by grpc",
	}}}, nil
}

func serveGRPCAuthz(t *testing.T) (*grpcAuthz, uint32) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	srv := &grpcAuthz{}
	authv3.RegisterAuthorizationServer(s, srv)
	go s.Serve(l)
	t.Cleanup(s.Stop)
	return srv, uint32(l.Addr().(*net.TCPAddr).Port)
}

// httpAuthz is an HTTP ext_authz service; it records what it was sent.
type httpAuthz struct {
	calls atomic.Int32
	last  atomic.Pointer[http.Request]
	body  atomic.Pointer[string]
}

func (s *httpAuthz) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.calls.Add(1)
	b, _ := io.ReadAll(r.Body)
	body := string(b)
	s.last.Store(r)
	s.body.Store(&body)
	switch r.Header.Get("X-Ext-Authz") {
	case "allow":
		w.Header().Set("X-User", "alice")
		w.Header().Set("X-Authz", "http")
		w.Header().Set("X-Secret", "not for upstream")
		return
	case "slow":
		<-r.Context().Done()
		return
	}
	w.Header().Set("WWW-Authenticate", `Bearer realm="http"`)
	w.Header().Set("X-Denied-By", "http")
	w.Header().Set("X-Internal", "not for the client")
	w.WriteHeader(http.StatusUnauthorized)
	io.WriteString(w, "denied by http")
}

func serveHTTPAuthz(t *testing.T) (*httpAuthz, uint32) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &httpAuthz{}
	hs := &http.Server{Handler: srv}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	return srv, uint32(l.Addr().(*net.TCPAddr).Port)
}

// customPolicy sends web's requests under /protected to provider.
func customPolicy(provider string) *authz.Policy {
	return &authz.Policy{Namespace: "demo", Name: "ext", Spec: &secv1beta1.AuthorizationPolicy{
		Action:       secv1beta1.AuthorizationPolicy_CUSTOM,
		ActionDetail: &secv1beta1.AuthorizationPolicy_Provider{Provider: &secv1beta1.AuthorizationPolicy_ExtensionProvider{Name: provider}},
		TargetRefs:   []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
		Rules:        []*secv1beta1.Rule{{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Paths: []string{"/protected*"}}}}}},
	}}
}

// extAuthzBed is the HTTP bed with one provider and the CUSTOM policy naming it.
func extAuthzBed(t *testing.T, p *meshv1alpha1.MeshConfig_ExtensionProvider, more ...*authz.Policy) *http.Client {
	b := extAuthzPortBed(t, route.Port{Name: "http-web", Port: 80}, p, more...)
	c, _ := b.httpClient(t, false)
	return c
}

func extAuthzPortBed(t *testing.T, port route.Port, p *meshv1alpha1.MeshConfig_ExtensionProvider, more ...*authz.Policy) *httpBed {
	reg := &extauthz.Registry{}
	if err := reg.Update([]*meshv1alpha1.MeshConfig_ExtensionProvider{p}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return newHTTPBed(t, port, func(h *waypoint.Handler) { h.ExtAuthz = reg; h.Inspect = waypoint.InspectAuto },
		append([]*authz.Policy{customPolicy(p.GetName())}, more...)...)
}

type extCase struct {
	name, path, decision string
	code                 int
	body                 string
	header               map[string]string // wanted on the response ("" means absent)
}

func runExtCases(t *testing.T, c *http.Client, cases []extCase) {
	t.Helper()
	for _, tc := range cases {
		code, body, hdr := get(t, c, "http://10.96.0.20:80"+tc.path, "X-Ext-Authz", tc.decision)
		if code != tc.code || tc.body != "" && !strings.HasPrefix(body, tc.body) {
			t.Errorf("%s: %d %q, want %d %q", tc.name, code, body, tc.code, tc.body)
		}
		for k, want := range tc.header {
			if got := hdr.Get(k); got != want {
				t.Errorf("%s: %s = %q, want %q", tc.name, k, got, want)
			}
		}
	}
}

// CUSTOM with Envoy's gRPC ext_authz: only matching requests are checked; an allow passes the
// provider's headers upstream and to the client; a denial answers the provider's status,
// headers and body.
func TestExtAuthzGRPC(t *testing.T) {
	srv, port := serveGRPCAuthz(t)
	c := extAuthzBed(t, &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "grpc-authz", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc{
		EnvoyExtAuthzGrpc: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider{Service: "127.0.0.1", Port: port},
	}})
	runExtCases(t, c, []extCase{
		{"not matched: no check", "/public", "deny", 200, "127.0.0.", map[string]string{"Echo-X-User": ""}},
		{"allow", "/protected/a", "allow", 200, "127.0.0.", map[string]string{"Echo-X-User": "alice", "X-Authz": "grpc"}},
		{"deny", "/protected/a", "deny", 401, "denied by grpc", map[string]string{"Www-Authenticate": `Bearer realm="grpc"`, "Echo-X-User": ""}},
	})
	if n := srv.calls.Load(); n != 2 {
		t.Errorf("provider called %d times, want 2 (the matching requests)", n)
	}
	// A gRPC client gets the denial as Envoy maps it: HTTP 200, grpc-status 16 for a 401.
	b := extAuthzPortBed(t, route.Port{Name: "grpc-web", Port: 80}, &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "grpc-authz",
		Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc{EnvoyExtAuthzGrpc: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider{Service: "127.0.0.1", Port: port}}})
	h2, _ := b.httpClient(t, true)
	code, _, hdr := get(t, h2, "http://10.96.0.20:80/protected/a", "X-Ext-Authz", "deny", "Content-Type", "application/grpc")
	if code != 200 || hdr.Get("Grpc-Status") != "16" || hdr.Get("Grpc-Message") != "denied by grpc" {
		t.Errorf("gRPC client denied: %d %v", code, hdr)
	}
	attrs := srv.last.Load().GetAttributes()
	if h := attrs.GetRequest().GetHttp(); h.GetMethod() != "POST" || h.GetPath() != "/protected/a" || h.GetHost() != "10.96.0.20:80" || attrs.GetSource().GetPrincipal() != "spiffe://cluster.local/ns/default/sa/sleep" {
		t.Errorf("check request: %v", attrs)
	}
}

// CUSTOM with the HTTP form: the check carries the method, pathPrefix + path, the headers
// includeRequestHeadersInCheck names and includeAdditionalHeadersInCheck; headersToUpstreamOnAllow,
// headersToDownstreamOnAllow and headersToDownstreamOnDeny select what passes on.
func TestExtAuthzHTTP(t *testing.T) {
	srv, port := serveHTTPAuthz(t)
	c := extAuthzBed(t, &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "http-authz", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp{
		EnvoyExtAuthzHttp: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{
			Service: "127.0.0.1", Port: port, PathPrefix: "/check",
			IncludeRequestHeadersInCheck:    []string{"x-ext-*"},
			IncludeAdditionalHeadersInCheck: map[string]string{"x-from": "detour"},
			HeadersToUpstreamOnAllow:        []string{"x-user"},
			HeadersToDownstreamOnAllow:      []string{"x-authz"},
			HeadersToDownstreamOnDeny:       []string{"x-denied-by"},
			IncludeRequestBodyInCheck:       &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationRequestBody{MaxRequestBytes: 100, AllowPartialMessage: true},
		},
	}})
	runExtCases(t, c, []extCase{
		{"allow", "/protected/b?q=1", "allow", 200, "127.0.0.", map[string]string{"Echo-X-User": "alice", "X-Authz": "http", "X-Secret": ""}},
		{"deny", "/protected/b", "deny", 401, "denied by http",
			map[string]string{"X-Denied-By": "http", "Www-Authenticate": `Bearer realm="http"`, "X-Internal": ""}},
		{"not matched", "/public", "deny", 200, "127.0.0.", nil},
	})
	if n := srv.calls.Load(); n != 2 {
		t.Errorf("provider called %d times, want 2", n)
	}
	last := srv.last.Load()
	if last.Method != "POST" || last.URL.Path != "/check/protected/b" || last.Header.Get("X-From") != "detour" || last.Header.Get("X-Ext-Authz") != "deny" || last.Host != "10.96.0.20:80" {
		t.Errorf("check request: %s %s host %s %v", last.Method, last.URL, last.Host, last.Header)
	}
	if b := *srv.body.Load(); b != pingBody[:100] {
		t.Errorf("check body: %d bytes, want the first 100 (allowPartialMessage)", len(b))
	}
}

// A provider that does not answer within its timeout: 403 (or statusOnError) without failOpen,
// the request allowed with it; an unknown provider denies what the CUSTOM policy matches.
func TestExtAuthzTimeoutAndUnknown(t *testing.T) {
	_, gport := serveGRPCAuthz(t)
	_, hport := serveHTTPAuthz(t)
	timeout := durationpb.New(50e6)
	grpcP := func(failOpen bool, status string) *meshv1alpha1.MeshConfig_ExtensionProvider {
		return &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "g", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc{
			EnvoyExtAuthzGrpc: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider{Service: "127.0.0.1", Port: gport, Timeout: timeout, FailOpen: failOpen, StatusOnError: status}}}
	}
	httpP := func(failOpen bool, status string) *meshv1alpha1.MeshConfig_ExtensionProvider {
		return &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "h", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp{
			EnvoyExtAuthzHttp: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{Service: "127.0.0.1", Port: hport, Timeout: timeout, FailOpen: failOpen, StatusOnError: status,
				IncludeRequestHeadersInCheck: []string{"x-ext-authz"}}}}
	}
	for _, tc := range []struct {
		name string
		p    *meshv1alpha1.MeshConfig_ExtensionProvider
		code int
	}{
		{"grpc, fail closed", grpcP(false, ""), 403},
		{"grpc, statusOnError", grpcP(false, "503"), 503},
		{"grpc, failOpen", grpcP(true, ""), 200},
		{"http, fail closed", httpP(false, ""), 403},
		{"http, statusOnError", httpP(false, "500"), 500},
		{"http, failOpen", httpP(true, ""), 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := extAuthzBed(t, tc.p)
			runExtCases(t, c, []extCase{{tc.name, "/protected", "slow", tc.code, "", nil}})
		})
	}
	t.Run("unknown provider", func(t *testing.T) {
		reg := &extauthz.Registry{}
		b := newHTTPBed(t, route.Port{Name: "http-web", Port: 80}, func(h *waypoint.Handler) { h.ExtAuthz = reg }, customPolicy("nope"))
		c, _ := b.httpClient(t, false)
		runExtCases(t, c, []extCase{
			{"matched", "/protected", "allow", 403, "RBAC: access denied", nil},
			{"not matched", "/public", "allow", 200, "127.0.0.", nil},
		})
	})
}

// After the provider allows, DENY and ALLOW still decide (Envoy's order: ext_authz, then RBAC).
func TestExtAuthzThenRBAC(t *testing.T) {
	_, port := serveGRPCAuthz(t)
	denyB := &authz.Policy{Namespace: "demo", Name: "no-b", Spec: &secv1beta1.AuthorizationPolicy{
		Action:     secv1beta1.AuthorizationPolicy_DENY,
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
		Rules:      []*secv1beta1.Rule{{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Paths: []string{"/protected/b"}}}}}},
	}}
	c := extAuthzBed(t, &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "grpc-authz", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc{
		EnvoyExtAuthzGrpc: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider{Service: "127.0.0.1", Port: port},
	}}, denyB)
	runExtCases(t, c, []extCase{
		{"allowed, no DENY", "/protected/a", "allow", 200, "127.0.0.", nil},
		{"allowed by the provider, then DENY", "/protected/b", "allow", 403, "RBAC: access denied", nil},
		{"denied by the provider first", "/protected/b", "deny", 401, "denied by grpc", nil},
	})
}

// An opaque stream (a port declared TCP) that a CUSTOM policy matches is checked at CONNECT time
// with a gRPC provider (Envoy's network ext_authz filter: source, principal, destination), a
// denial refusing the CONNECT; an HTTP provider is not called for it, as istiod builds no
// network filter for one.
func TestExtAuthzOpaqueStream(t *testing.T) {
	srv, gport := serveGRPCAuthz(t)
	_, hport := serveHTTPAuthz(t)
	tcp := route.Port{Name: "tcp-web", Port: 80}
	grpcB := extAuthzPortBed(t, tcp, &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "g", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc{
		EnvoyExtAuthzGrpc: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider{Service: "127.0.0.1", Port: gport}}})
	httpB := extAuthzPortBed(t, tcp, &meshv1alpha1.MeshConfig_ExtensionProvider{Name: "h", Provider: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp{
		EnvoyExtAuthzHttp: &meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider{Service: "127.0.0.1", Port: hport}}})
	stream := func(b *httpBed) error {
		s, err := b.client.Dial(context.Background(), b.waypoint, "10.96.0.20:80", b.opts)
		if err != nil {
			return err
		}
		defer s.Close()
		io.WriteString(s, "\x00\x01binary\r\n\r\n")
		s.CloseWrite()
		if got, _ := io.ReadAll(s); !strings.HasPrefix(string(got), "HTTP/1.1 400") {
			t.Errorf("the stream did not reach the app: %q", got)
		}
		return nil
	}
	var se *hbone.StatusError
	if err := stream(grpcB); !errors.As(err, &se) || se.Code != 403 {
		t.Errorf("gRPC provider denies the stream: got %v, want CONNECT 403", err)
	}
	if a := srv.last.Load().GetAttributes(); a.GetSource().GetPrincipal() != "spiffe://cluster.local/ns/default/sa/sleep" || a.GetDestination().GetAddress().GetSocketAddress().GetPortValue() != 80 {
		t.Errorf("check request: %v", a)
	}
	srv.allowStreams.Store(true)
	if err := stream(grpcB); err != nil {
		t.Errorf("gRPC provider allows the stream: %v", err)
	}
	if err := stream(httpB); err != nil {
		t.Errorf("HTTP provider (not called for an opaque stream): %v", err)
	}
}
