// Package waypoint is the hbone.Handler that forwards like Istio's waypoint: each inbound CONNECT
// names a service VIP:port (or a pod IP:port); the waypoint picks a ready endpoint and opens HBONE
// to that pod's ztunnel (podIP:15008, authority podIP:targetPort) with its own identity, passing
// on Forwarded, baggage and traceparent. The 200 goes back only once that onward stream is up.
// Where Istio's waypoint parses HTTP (a port declared HTTP/HTTP2/gRPC, or an undeclared port
// sniffed as HTTP; see Inspect), HTTP/1.1 or HTTP/2 (gRPC) is served request by request: each
// request is authorized, balanced over the endpoints and counted on its own.
package waypoint

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/extauthz"
	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/sniff"
)

// DefaultHBONEPort is where a destination's ztunnel terminates HBONE.
const DefaultHBONEPort = 15008

// DefaultConnectTimeout bounds the onward dial to one endpoint.
const DefaultConnectTimeout = 5 * time.Second

// DefaultOpaqueSniffWait is Handler.OpaqueSniffWait's default.
const DefaultOpaqueSniffWait = 200 * time.Millisecond

// DefaultMaxSniffing is Handler.MaxSniffing's default: streams of one client waiting for their
// first bytes at once.
const DefaultMaxSniffing = 64

// Inspect says when the waypoint looks inside a stream.
type Inspect int

const (
	// InspectAuto parses HTTP where Istio's waypoint does: on every port declared HTTP, HTTP2 or
	// gRPC, and on every undeclared port once sniffed as HTTP (protocol detection; TLS and
	// other bytes are then spliced opaque, decided with the SNI). So every HTTP request is
	// authorized on its own (a denial is Envoy's 403, gRPC status 7), balanced and counted.
	// Declared TCP and TLS ports stay opaque, decided at CONNECT time unless a policy needs the
	// SNI; so does a stream a whole-stream session takes (the developer gets it as a stream).
	InspectAuto Inspect = iota
	// InspectAlways sniffs every stream not declared opaque TCP, declared TLS included, and
	// parses HTTP wherever it is found.
	InspectAlways
	// InspectOpaque looks inside only when a policy that applies to the destination needs an
	// attribute the content gives (HTTP fields, SNI) or a session filters requests; every other
	// stream is decided at CONNECT time and spliced untouched (a denied HTTP client sees a
	// refused CONNECT; its requests are not counted). detour's opaque-first fast path.
	InspectOpaque
)

// Handler forwards streams to their services' endpoints over HBONE.
type Handler struct {
	// Routes returns the current route table; it may change between streams (and requests).
	Routes func() *route.Table
	// Balancer spreads streams and requests and ejects endpoints that fail to connect; nil means
	// round robin without ejection.
	Balancer *route.Balancer
	// Identity is the waypoint's own identity, presented on the onward hop.
	Identity identity.Source
	// Dialer opens the onward HBONE streams (pooled per endpoint and identity).
	Dialer *hbone.Dialer
	// Policies returns the current AuthorizationPolicy engine; nil allows everything.
	Policies func() *authz.Engine
	// Authn returns the current RequestAuthentications; nil (or a nil result) validates no
	// token, so no request has a request principal.
	Authn func() *authn.Authenticator
	// ExtAuthz holds the mesh config's ext_authz providers, which CUSTOM policies name (HTTP
	// requests only); nil means none: the requests a CUSTOM policy matches are denied.
	ExtAuthz *extauthz.Registry
	// Inspect says when streams are sniffed and HTTP parsed; the zero value is InspectAuto.
	Inspect Inspect
	// SniffWait bounds, from the 200 on, the wait for the client bytes that decide a stream's
	// protocol (or its SNI) where Istio's waypoint waits for its listener filters: undeclared
	// ports and ports declared TLS. 0 means sniff.DefaultWait, Envoy's listener_filters_timeout
	// default (15 s), which Istio leaves in place there. When it runs out the stream is reset
	// and counted (detour_sniff_refused_total{reason="timeout"}), as Envoy closes the socket
	// (continue_on_listener_filters_timeout unset): a server-speaks-first protocol works on a
	// declared port only, as with Istio's waypoint.
	SniffWait time.Duration
	// OpaqueSniffWait bounds the sniff of a port declared opaque (tcp, mysql, ...) that detour
	// looks into for its own ends (a TLSRoute's SNI, a session's filter, inspect: always), where
	// Istio's waypoint does not wait at all; when it runs out the stream is carried as declared,
	// so server-first protocols keep working there. 0 means DefaultOpaqueSniffWait.
	OpaqueSniffWait time.Duration
	// MaxSniffing bounds the streams of one client (its peer identity, else its address)
	// waiting for their first bytes at once, so that silent streams cannot pin the waypoint's
	// streams and onward dials: one more is refused with a 503 before anything is dialed, and
	// counted (detour_sniff_refused_total{reason="limit"}). 0 means DefaultMaxSniffing.
	MaxSniffing int
	// HBONEPort is the destination ztunnel's port; 0 means DefaultHBONEPort.
	HBONEPort uint16
	// ConnectTimeout bounds each onward attempt; 0 means DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// HalfCloseTimeout: see hbone.Splice.
	HalfCloseTimeout time.Duration
	// Metrics records streams, requests, bytes and decisions; nil records nothing.
	Metrics *metrics.Metrics
	Logger  *slog.Logger // nil means slog.Default()
	// AccessLog, when set, gets one record per HTTP request and per opaque stream.
	AccessLog *slog.Logger
	// HTTPRoutes returns the current HTTPRoutes and GRPCRoutes attached to services; nil
	// means none (every request is forwarded to the service it addressed).
	HTTPRoutes func() *httproute.Table
	// L4Routes returns the current TCPRoutes and TLSRoutes attached to services; nil means
	// none (every stream is forwarded to the service it addressed).
	L4Routes func() *l4route.Table
	// RouteRand draws route weights and mirror fractions; nil means math/rand/v2.IntN.
	RouteRand func(n int) int
	// Sessions are the developers' debug sessions (steal, mirror); nil means none.
	Sessions *session.Registry
	// NumTrustedProxies is how many proxies in front of the mesh appended to X-Forwarded-For
	// (the mesh config's numTrustedProxies): remote.ip is the entry that many from the right.
	NumTrustedProxies int
	// Own are the waypoint's own addresses known without discovery (listeners, pod IPs): a
	// CONNECT to one, or an endpoint at one, is a forwarding loop and refused at once, as is
	// one to the route table's Self services. Nil means only those.
	Own *Own

	tlsMu  sync.Mutex
	tlsFor map[spiffeid.ID]*tls.Config
	sniffs sniffing
	hop    atomic.Pointer[hopMarker] // the onward CONNECTs' marker, for the identity it names
}

// hopMarker is the Detour-Hop header of one identity, shared read-only by every onward CONNECT
// (one map, not one per stream).
type hopMarker struct {
	id     spiffeid.ID
	header http.Header
}

func (h *Handler) hopHeader(own spiffeid.ID) http.Header {
	if m := h.hop.Load(); m != nil && m.id == own {
		return m.header
	}
	m := &hopMarker{id: own, header: http.Header{HopHeader: {own.String()}}}
	h.hop.Store(m)
	return m.header
}

// ServeHBONE serves one CONNECT in phases: the plan (where to, which policy and sessions; a
// refusal here dials nothing), then what can still fail before the 200 (the whole-stream steal's
// developer, the addressed service's, then its route's backend's; the route's refusal; the
// onward dial, trying the next endpoint when one fails to connect), then the 200 and the
// stream's carriage. The 200 goes back only once an onward stream (or the developer)
// is there, except for a stream whose TCPRoutes or TLSRoutes decide by its first bytes.
func (h *Handler) ServeHBONE(s *hbone.Stream) error {
	p, err := h.plan(s.Request())
	if err != nil {
		return err
	}
	if p.relay {
		return h.serveRelay(s)
	}
	if c := p.check; c != nil {
		if err := h.settle(c.req, p.req, c.dec, h.checkStream(s.Context(), p.req)); err != nil {
			return err
		}
	}
	if !p.inspect && p.steal != nil {
		if handled, err := h.stealStream(s, s, p, p.steal, p.proto); handled {
			return err
		}
	}
	if !p.inspect && p.l4 != nil {
		if handled, err := h.takeRouted(s, s, p, p.proto); handled {
			return err
		}
	}
	if p.sniffs() {
		// A stream that waits for its client's bytes holds a share of its client's, taken
		// before anything is dialed and given back once the bytes decided (peek).
		if p.endSniff = h.sniffs.hold(h, p.req); p.endSniff == nil {
			return fmt.Errorf("waypoint: %w: %s has %d streams waiting for their first bytes", hbone.ErrUnavailable, clientKey(p.req), h.maxSniffing())
		}
		defer p.sniffDone()
	}
	// A stream whose TCPRoutes or TLSRoutes wait for its first bytes (its SNI, or whether it is
	// HTTP) is accepted first: where it goes is not known before the 200 (as Envoy's waypoint,
	// whose filter chain is picked after the CONNECT). Every other stream's 200 waits for its
	// onward stream.
	var up *hbone.Stream
	if !p.inspect || p.l4 == nil {
		var err error
		if up, err = h.connect(s.Context(), p.req, p.onward()); err != nil {
			return err
		}
	}
	if err := s.Accept(); err != nil {
		closeStream(up)
		return err
	}
	return h.serveAccepted(s, up, p)
}

// splice moves an opaque stream's bytes and records it.
func (h *Handler) splice(in net.Conn, up *hbone.Stream, req *hbone.Request, dest *route.Destination, proto sniff.Protocol) error {
	ep := up.Request().Target.Addr
	h.Balancer.Started(ep)
	rec := h.openRecord(req, dest, proto, up.Request().Target.String())
	if s, ok := in.(*hbone.Stream); ok {
		// Stream to stream: the handler returns and the pair runs only while bytes flow, so an
		// idle proxied stream holds no goroutine stack (BENCHMARKS.md, issue 21).
		if release := s.Detach(); release != nil {
			hbone.SpliceAsync(s, up, h.HalfCloseTimeout, func(counts hbone.Counts, err error) {
				rec.close(counts, err)
				h.Balancer.Done(up.Request().Target.Addr) // ep, which this closure need not hold
				release(err)
			})
			return nil
		}
	}
	counts, err := hbone.SpliceCount(in, up, h.HalfCloseTimeout)
	rec.close(counts, err)
	h.Balancer.Done(ep)
	return err
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// protocolOf reads a port's declared protocol: appProtocol first, then Istio's port-name prefix
// (http-, grpc-, tcp-, ...). declared is false when neither says anything: sniff.
func protocolOf(p route.Port) (proto sniff.Protocol, declared bool) {
	name := strings.ToLower(p.AppProtocol)
	if name == "" {
		name, _, _ = strings.Cut(strings.ToLower(p.Name), "-")
		if _, known := portNames[name]; !known {
			return sniff.TCP, false
		}
	}
	if proto, ok := portNames[name]; ok {
		return proto, true
	}
	return sniff.TCP, true // some other declared protocol (mysql, redis, ...): opaque
}

var portNames = map[string]sniff.Protocol{
	"http": sniff.HTTP1, "http1.1": sniff.HTTP1, "http2": sniff.HTTP2, "h2c": sniff.HTTP2, "kubernetes.io/h2c": sniff.HTTP2,
	"grpc": sniff.HTTP2, "grpc-web": sniff.HTTP1, "tls": sniff.TLS, "https": sniff.TLS, "tcp": sniff.TCP,
	"mongo": sniff.TCP, "mysql": sniff.TCP, "redis": sniff.TCP,
}

// connect opens the onward stream to the first candidate that answers 200.
func (h *Handler) connect(ctx context.Context, req *hbone.Request, dest *route.Destination) (*hbone.Stream, error) {
	if len(dest.Candidates) == 0 {
		return nil, fmt.Errorf("waypoint: %w: %w for %s", hbone.ErrUnavailable, route.ErrNoEndpoints, dest.Service.Hostname)
	}
	var errs []error
	for _, ep := range dest.Candidates {
		up, err := h.dialEndpoint(ctx, req, dest, ep)
		if err == nil {
			return up, nil
		}
		var de *dialError
		if !errors.As(err, &de) {
			return nil, err
		}
		h.log().Debug("waypoint: endpoint failed, trying the next", "endpoint", ep, "err", err)
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("waypoint: every endpoint of %s failed: %w", dest.Service.Hostname, errors.Join(errs...))
}

// dialError is an onward dial that failed before anything was sent: another endpoint may be tried.
type dialError struct {
	ep  netip.AddrPort
	err error
}

func (e *dialError) Error() string { return fmt.Sprintf("dialing endpoint %s: %v", e.ep, e.err) }
func (e *dialError) Unwrap() error { return e.err }

// dialEndpoint opens HBONE to ep's ztunnel with the waypoint's identity, passing the original
// source on; it updates the balancer's view of ep. Onward connections are pooled per inbound peer
// identity (Tenant), as ztunnel pools per source workload: one client's unread streams never
// take the connection window or stream slots of another client's.
func (h *Handler) dialEndpoint(ctx context.Context, req *hbone.Request, dest *route.Destination, ep netip.AddrPort) (*hbone.Stream, error) {
	serverID, err := h.endpointID(dest, ep)
	if err != nil {
		return nil, err
	}
	tlsCfg, err := h.clientTLS(serverID)
	if err != nil {
		return nil, err
	}
	own, _ := h.Identity.Identity()
	if own == nil {
		return nil, fmt.Errorf("waypoint: %w", identity.ErrNoIdentity)
	}
	forwarded := req.Forwarded
	if forwarded == "" {
		if ap, ok := addrPort(req.RemoteAddr); ok {
			forwarded = hbone.FormatForwarded(hbone.ForwardedElement{For: ap.String()})
		}
	}
	timeout := h.ConnectTimeout
	if timeout <= 0 {
		timeout = DefaultConnectTimeout
	}
	port := h.HBONEPort
	if port == 0 {
		port = DefaultHBONEPort
	}
	dial := netip.AddrPortFrom(ep.Addr(), port)
	if err := h.selfEndpoint(dest, ep, dial); err != nil {
		return nil, err
	}
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	up, err := h.Dialer.Dial(actx, dial.String(), ep.String(), hbone.DialOptions{
		TLSConfig:   tlsCfg,
		ServerID:    serverID.String(),
		LocalID:     own.SVID.ID.String(),
		Tenant:      req.PeerID.String(),
		Forwarded:   forwarded,
		Baggage:     req.Baggage,
		Traceparent: req.Traceparent,
		Header:      h.hopHeader(own.SVID.ID),
	})
	if err == nil {
		h.Balancer.Succeeded(ep)
		return up, nil
	}
	var se *hbone.StatusError
	if !errors.As(err, &se) {
		h.Balancer.Failed(ep) // the endpoint's ztunnel did not answer: eject it for a while
	}
	return nil, &dialError{ep: ep, err: err}
}

// endpointID is the identity the endpoint's ztunnel must present: the endpoint's service account.
func (h *Handler) endpointID(dest *route.Destination, ep netip.AddrPort) (spiffeid.ID, error) {
	own, _ := h.Identity.Identity()
	if own == nil {
		return spiffeid.ID{}, fmt.Errorf("waypoint: %w", identity.ErrNoIdentity)
	}
	for _, e := range dest.Service.Endpoints {
		if e.IP == ep.Addr() && e.ServiceAccount != "" {
			ns := e.Namespace
			if ns == "" {
				ns = dest.Service.Namespace
			}
			return spiffeid.FromSegments(own.Bundle.TrustDomain(), "ns", ns, "sa", e.ServiceAccount)
		}
	}
	return spiffeid.ID{}, fmt.Errorf("waypoint: %w: endpoint %s of %s has no service account, so its identity cannot be checked", hbone.ErrUnavailable, ep, dest.Service.Hostname)
}

func (h *Handler) clientTLS(id spiffeid.ID) (*tls.Config, error) {
	h.tlsMu.Lock()
	defer h.tlsMu.Unlock()
	if c, ok := h.tlsFor[id]; ok {
		return c, nil
	}
	c, err := identity.ClientTLS(h.Identity, id)
	if err != nil {
		return nil, err
	}
	if h.tlsFor == nil {
		h.tlsFor = map[spiffeid.ID]*tls.Config{}
	}
	h.tlsFor[id] = c
	return c, nil
}

func (h *Handler) log() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.Default()
}
