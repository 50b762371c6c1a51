// Package extauthz calls the external authorization providers of Istio's mesh config
// (extensionProviders envoyExtAuthzHttp and envoyExtAuthzGrpc) the way Envoy's ext_authz filter
// does for a CUSTOM AuthorizationPolicy: the gRPC form speaks envoy.service.auth.v3.Authorization
// (go-control-plane's types), the HTTP form sends the request's method, path and selected headers
// to the service and allows on 200. Each provider has one Checker with one client, reused by every
// request and bounded in connections; a check never outlasts the provider's timeout, and a
// failed check (timeout, unreachable, broken answer) allows only with failOpen, else answers
// statusOnError.
//
// Behaviour follows istiod's translation (pilot/pkg/security/authz/builder/extauthz.go) and
// Envoy's filters (source/extensions/filters/common/ext_authz/ext_authz_grpc_impl.cc,
// ext_authz_http_impl.cc); detour reads them, copies nothing.
package extauthz

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
)

// DefaultTimeout is istiod's timeout for a check when the provider sets none (extauthz.go
// timeoutOrDefault: 600s).
const DefaultTimeout = 600 * time.Second

// DefaultStatusOnError is Envoy's answer to a failed check without statusOnError: 403.
const DefaultStatusOnError = http.StatusForbidden

// Bounds on what a provider can make the waypoint hold.
const (
	maxConns        = 64      // connections to one HTTP provider
	maxResponseBody = 1 << 20 // an HTTP provider's denial body, buffered
	maxRequestBody  = 8 << 20 // includeRequestBodyInCheck.maxRequestBytes cap
)

// ErrCheck wraps every failed check (not a denial): the provider could not be asked, or its
// answer could not be read.
var ErrCheck = errors.New("extauthz: check failed")

// Request is what a check is about.
type Request struct {
	Source      netip.AddrPort // the client (the HBONE connection's peer)
	Destination netip.AddrPort // the CONNECT's target
	// Principal is the client's SPIFFE ID (spiffe://...), "" when it has none.
	Principal string
	// HTTP is the request, nil for an opaque stream (gRPC providers only). Its Body may be
	// replaced by Check (includeRequestBodyInCheck reads it ahead, then replays it).
	HTTP *http.Request
	// SetReadDeadline sets the read deadline of HTTP's body, as http.ResponseController does for
	// the request being served: Check bounds the read of a body for includeRequestBodyInCheck by
	// the provider's timeout with it, and clears it after. nil: the read is not bounded (only
	// for a body that cannot block, such as one in memory).
	SetReadDeadline func(time.Time) error
}

// Result is a provider's answer.
type Result struct {
	Allow bool
	// Status, Header and Body are the answer to the client on a denial.
	Status int
	Header http.Header
	Body   []byte
	// On an allow: UpstreamSet headers replace the request's, UpstreamAppend ones are added,
	// UpstreamRemove ones removed, before it goes on; Downstream are added to the response.
	UpstreamSet, UpstreamAppend http.Header
	UpstreamRemove              []string
	Downstream                  http.Header
	// Err is why the check failed (wrapping ErrCheck; Allow is then the provider's failOpen), or
	// with Local why the request was refused.
	Err error
	// Local: the waypoint answered without asking the provider, as Envoy's connection manager
	// does, for a body includeRequestBodyInCheck could not buffer: over maxRequestBytes without
	// allowPartialMessage (413), not all there within the provider's timeout (408), unreadable
	// (400). Not the provider's denial, and failOpen does not apply.
	Local bool
}

// Checker asks one provider.
type Checker struct {
	name     string
	spec     *meshv1alpha1.MeshConfig_ExtensionProvider // immutable
	timeout  time.Duration
	onError  int
	failOpen bool
	body     *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationRequestBody
	check    func(ctx context.Context, r *Request, b *body) (Result, error) // b nil: no body buffered
	close    func() error
}

// Streams reports whether the provider checks opaque streams too (gRPC: Envoy's network
// ext_authz filter); an HTTP provider checks HTTP requests only.
func (c *Checker) Streams() bool { return c.spec.GetEnvoyExtAuthzGrpc() != nil }

// Name is the provider's name.
func (c *Checker) Name() string { return c.name }

// Check asks the provider about r, within the provider's timeout (once the body
// includeRequestBodyInCheck asks for is buffered, itself bounded by that timeout: see readBody).
// It never fails: a failed check is a Result with Err set, allowed only with failOpen.
func (c *Checker) Check(ctx context.Context, r *Request) Result {
	b, refused := c.readBody(r)
	if refused != nil {
		return *refused
	}
	// Envoy's timeout is the check call's (started in initiateCall, once the body is there).
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	res, err := c.check(ctx, r, b)
	if err != nil {
		f := c.failed(fmt.Errorf("%w: provider %s: %w", ErrCheck, c.name, err))
		if res.Status != 0 { // a gRPC error_response's own answer
			f.Status = res.Status
		}
		f.Header, f.Body = res.Header, res.Body
		return f
	}
	return res
}

func (c *Checker) failed(err error) Result {
	return Result{Allow: c.failOpen, Status: c.onError, Err: err}
}

// Config is what every checker shares.
type Config struct {
	// Dial opens a connection to a provider's host:port; nil means a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

func (cfg Config) dial() func(ctx context.Context, network, addr string) (net.Conn, error) {
	if cfg.Dial != nil {
		return cfg.Dial
	}
	var d net.Dialer
	return d.DialContext
}

// NewChecker validates p as istiod does and builds its checker; it does no I/O. A provider of
// another kind (tracing, logging) is an error too: CUSTOM cannot name it.
func NewChecker(p *meshv1alpha1.MeshConfig_ExtensionProvider, cfg Config) (*Checker, error) {
	c := &Checker{name: p.GetName(), spec: p}
	var err error
	switch v := p.GetProvider().(type) {
	case *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp:
		err = c.setCommon(v.EnvoyExtAuthzHttp.GetService(), v.EnvoyExtAuthzHttp.GetPort(), v.EnvoyExtAuthzHttp.GetTimeout().AsDuration(),
			v.EnvoyExtAuthzHttp.GetStatusOnError(), v.EnvoyExtAuthzHttp.GetFailOpen(), v.EnvoyExtAuthzHttp.GetIncludeRequestBodyInCheck())
		if err == nil {
			err = newHTTP(c, v.EnvoyExtAuthzHttp, cfg)
		}
	case *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc:
		err = c.setCommon(v.EnvoyExtAuthzGrpc.GetService(), v.EnvoyExtAuthzGrpc.GetPort(), v.EnvoyExtAuthzGrpc.GetTimeout().AsDuration(),
			v.EnvoyExtAuthzGrpc.GetStatusOnError(), v.EnvoyExtAuthzGrpc.GetFailOpen(), v.EnvoyExtAuthzGrpc.GetIncludeRequestBodyInCheck())
		if err == nil {
			err = newGRPC(c, v.EnvoyExtAuthzGrpc, cfg)
		}
	default:
		err = errors.New("not an envoyExtAuthzHttp or envoyExtAuthzGrpc provider")
	}
	if err != nil {
		return nil, fmt.Errorf("extauthz: provider %q: %w", p.GetName(), err)
	}
	return c, nil
}

func (c *Checker) setCommon(service string, port uint32, timeout time.Duration, statusOnError string, failOpen bool,
	body *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationRequestBody) error {
	if c.name == "" {
		return errors.New("a provider needs a name")
	}
	if service == "" {
		return errors.New("service is required")
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("port must be in 1..65535, got %d", port)
	}
	c.timeout, c.failOpen, c.body = timeout, failOpen, body
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	c.onError = DefaultStatusOnError
	if statusOnError != "" {
		code, err := strconv.Atoi(statusOnError)
		if _, known := typev3.StatusCode_name[int32(code)]; err != nil || !known {
			return fmt.Errorf("statusOnError %q is not an HTTP status Envoy knows", statusOnError)
		}
		c.onError = code
	}
	if body != nil && (body.GetMaxRequestBytes() == 0 || body.GetMaxRequestBytes() > maxRequestBody) {
		return fmt.Errorf("includeRequestBodyInCheck.maxRequestBytes must be in 1..%d, got %d", maxRequestBody, body.GetMaxRequestBytes())
	}
	return nil
}

// address is where the provider listens. Istio names a mesh service by hostname, optionally
// "namespace/hostname" (model.LookupCluster); detour dials the hostname, resolved by the
// waypoint's resolver (cluster DNS in Kubernetes), directly rather than through HBONE.
func address(service string, port uint32) string {
	if _, host, ok := strings.Cut(service, "/"); ok {
		service = host
	}
	return net.JoinHostPort(service, strconv.Itoa(int(port)))
}

// Registry holds the current checkers by provider name. Update keeps the client of a provider
// whose definition did not change, so connections survive a config change.
type Registry struct {
	Config Config

	mu       sync.Mutex
	checkers map[string]*Checker // guarded by mu; each immutable
	errs     map[string]error    // why a named provider has no checker
	closed   bool
}

// Checker is the named provider's checker, or nil and why it cannot be used.
func (r *Registry) Checker(name string) (*Checker, error) {
	if r == nil {
		return nil, fmt.Errorf("extauthz: no provider %q: no extension providers configured", name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if c := r.checkers[name]; c != nil {
		return c, nil
	}
	if err := r.errs[name]; err != nil {
		return nil, err
	}
	names := make([]string, 0, len(r.checkers))
	for n := range r.checkers {
		names = append(names, n)
	}
	return nil, fmt.Errorf("extauthz: no provider %q among %v", name, names)
}

// Update replaces the providers with ps (the mesh config's extensionProviders; kinds other than
// ext_authz are skipped). An invalid or duplicate provider is left out and reported in the
// returned error; CUSTOM policies naming it deny what they match.
func (r *Registry) Update(ps []*meshv1alpha1.MeshConfig_ExtensionProvider) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	next, nextErrs := map[string]*Checker{}, map[string]error{}
	var errs []error
	count := map[string]int{}
	for _, p := range ps {
		count[p.GetName()]++
	}
	for _, p := range ps {
		switch p.GetProvider().(type) {
		case *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp, *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc:
		default:
			continue
		}
		name := p.GetName()
		if count[name] > 1 {
			if nextErrs[name] == nil {
				nextErrs[name] = fmt.Errorf("extauthz: provider %q is defined %d times (istiod: names must be unique)", name, count[name])
				errs = append(errs, nextErrs[name])
			}
			continue
		}
		if old := r.checkers[name]; old != nil && proto.Equal(old.spec, p) {
			next[name] = old
			continue
		}
		c, err := NewChecker(p, r.Config)
		if err != nil {
			nextErrs[name] = err
			errs = append(errs, err)
			continue
		}
		next[name] = c
	}
	// A check in flight on a replaced client fails (ErrCheck), answered as the provider's
	// failOpen/statusOnError say.
	for name, old := range r.checkers {
		if next[name] != old {
			errs = append(errs, closeChecker(old))
		}
	}
	r.checkers, r.errs = next, nextErrs
	return errors.Join(errs...)
}

// Close closes every provider's client; later updates are ignored. Idempotent.
func (r *Registry) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, c := range r.checkers {
		errs = append(errs, closeChecker(c))
	}
	r.checkers, r.closed = nil, true
	return errors.Join(errs...)
}

func closeChecker(c *Checker) error {
	if c.close == nil {
		return nil
	}
	return c.close()
}

// GRPCStatus is the gRPC status Envoy answers a gRPC client with in place of HTTP status code
// (Grpc::Utility::httpToGrpcStatus).
func GRPCStatus(code int) int {
	switch code {
	case http.StatusBadRequest:
		return 13 // INTERNAL
	case http.StatusUnauthorized:
		return 16 // UNAUTHENTICATED
	case http.StatusForbidden:
		return 7 // PERMISSION_DENIED
	case http.StatusNotFound:
		return 12 // UNIMPLEMENTED
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return 14 // UNAVAILABLE
	}
	return 2 // UNKNOWN
}

// Validate checks p as NewChecker does, building nothing.
func Validate(p *meshv1alpha1.MeshConfig_ExtensionProvider) error {
	c, err := NewChecker(p, Config{})
	if err != nil {
		return err
	}
	return closeChecker(c)
}
