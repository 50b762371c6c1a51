package waypoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
)

// Bounds on an inspected HTTP stream (Envoy's defaults where it has one).
const (
	maxHeaderBytes    = 60 << 10         // Envoy's max_request_headers_kb
	readHeaderTimeout = 60 * time.Second // a client that never finishes its headers
	httpIdleTimeout   = time.Hour        // Envoy's HTTP connection idle_timeout
	maxH2Streams      = 1000
)

// httpStream serves the HTTP requests that arrive on one inbound HBONE stream. Each request is
// authorized, then sent (with the inbound protocol: HTTP/1.1 or HTTP/2 prior knowledge) to an
// endpoint the balancer picks for that request, over the stream's own onward connections.
type httpStream struct {
	h      *Handler
	req    *hbone.Request // the inbound CONNECT; immutable
	labels metrics.Stream
	svcNS  string // the destination service and port, for sessions; immutable
	svc    string
	port   uint16
	proxy  *httputil.ReverseProxy // Upgrade requests (forwarder.upgrade)
	fwd    *forwarder

	mu    sync.Mutex
	pre   *hbone.Stream // dialed before the 200; the first dial to its endpoint takes it
	h1    *http.Transport
	h2    *http.Transport
	ended bool
	dests map[string]*route.Destination // endpoint address: the routed backend it was picked for

	mirrorSlots chan struct{} // RequestMirror copies in flight (routeMirror)
	mirrorWG    sync.WaitGroup
	mirrorCtx   context.Context // ends with the stream
	mirrorStop  context.CancelFunc
}

// copyBuffers are ReverseProxy's body copy buffers: without a pool it allocates 32 KiB per
// request (59% of the bytes the waypoint allocated per request, BENCHMARKS.md).
var copyBuffers = &bufferPool{}

type bufferPool struct{ p sync.Pool }

const copyBufferSize = 32 << 10 // ReverseProxy's own size

func (b *bufferPool) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, copyBufferSize)
}

func (b *bufferPool) Put(buf []byte) {
	if cap(buf) == copyBufferSize {
		buf = buf[:copyBufferSize]
		b.p.Put(&buf)
	}
}

// serveHTTP serves in until the client closes it, the stream ends or the idle timeout passes.
// up is the onward stream dialed before the 200; it is reused for the first request to its
// endpoint.
func (h *Handler) serveHTTP(ctx context.Context, in net.Conn, up *hbone.Stream, req *hbone.Request, dest *route.Destination) error {
	hs := &httpStream{h: h, req: req, labels: h.streamLabels(req, dest), pre: up, port: dest.Port.Port,
		mirrorSlots: make(chan struct{}, maxRouteMirrors)}
	hs.mirrorCtx, hs.mirrorStop = context.WithCancel(context.WithoutCancel(ctx))
	if dest.Service != nil {
		hs.svcNS, hs.svc = dest.Service.Namespace, dest.Service.Name
	}
	hs.proxy = &httputil.ReverseProxy{
		Rewrite:       hs.rewrite,
		Transport:     hs,
		FlushInterval: -1, // streaming (WebSocket): every write goes on at once
		BufferPool:    copyBuffers,
		ErrorHandler:  hs.proxyError,
		ErrorLog:      slog.NewLogLogger(h.log().Handler(), slog.LevelDebug),
	}
	hs.fwd = &forwarder{rt: hs, target: req.Target.String(), onError: hs.proxyError, upgrade: hs.proxy}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{
		Handler:           hs,
		Protocols:         &protocols,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       httpIdleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: maxH2Streams},
		ErrorLog:          slog.NewLogLogger(h.log().Handler(), slog.LevelDebug),
	}
	conn := &servedConn{Conn: in, done: make(chan struct{})}
	l := &oneConnListener{conn: conn, closed: make(chan struct{})}
	go srv.Serve(l)
	select {
	case <-conn.done:
	case <-ctx.Done():
	}
	srv.Close()
	hs.close()
	return nil
}

// ServeHTTP authorizes one request and proxies it; it records the request once answered.
func (hs *httpStream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w}
	grpc := isGRPC(r)
	path, ok := "*", r.RequestURI == "*"
	if !ok {
		path, ok = normalizePath(r.URL.EscapedPath())
	}
	if !ok {
		localReply(rec, grpc, http.StatusBadRequest, 3, "invalid path")
	} else {
		if path != "*" {
			r.URL.RawPath = path
			r.URL.Path, _ = url.PathUnescape(path) // valid: normalizePath checked every escape
		}
		r = r.WithContext(context.WithValue(r.Context(), recorderKey{}, rec))
		hr := &authz.HTTPRequest{Host: r.Host, Method: r.Method, Path: path, Header: r.Header}
		dest, _ := hs.h.Routes().Resolve(hs.req.Target.Addr, nil)
		if dest == nil {
			dest = &route.Destination{}
		}
		if hs.authorizeHTTP(rec, r, grpc, dest, hr) {
			steal, mirrors := requestSessions(hs.h.Sessions.For(hs.svcNS, hs.svc, hs.port), r, path)
			if len(mirrors) > 0 {
				hs.mirrorRequest(r, path, mirrors)
			}
			if steal != nil {
				hs.stealRequest(rec, r, path, steal)
			} else if !hs.routeHTTP(rec, r, path, grpc) {
				hs.forward(rec, r)
			}
		}
	}
	if rec.code == 0 {
		rec.code = http.StatusOK
	}
	if rec.flags == "" {
		rec.flags = "-"
	}
	done := metrics.Request{Protocol: "http", Code: rec.code, Flags: rec.flags, Duration: time.Since(start)}
	if grpc {
		done.Protocol, done.GRPCStatus = "grpc", grpcStatus(rec.Header())
	}
	labels := hs.labels
	if rec.dest != nil {
		labels = hs.h.withEndpoint(labels, rec.dest, rec.ep)
	}
	hs.h.Metrics.RequestDone(labels, done)
	if al := hs.h.AccessLog; al != nil {
		al.Info("request", "protocol", r.Proto, "method", r.Method, "authority", r.Host, "path", path,
			"status", rec.code, "grpc_status", done.GRPCStatus, "flags", done.Flags, "source", authz.Principal(hs.labels.Source.Principal),
			"service", hs.labels.Service, "upstream", rec.upstream, "duration_ms", done.Duration.Milliseconds())
	}
}

// rewrite addresses the outbound request; the endpoint is chosen in RoundTrip. Forwarding
// headers pass through untouched: the waypoint is not a new hop for the application.
func (hs *httpStream) rewrite(pr *httputil.ProxyRequest) {
	pr.Out.URL.Scheme = "http"
	pr.Out.URL.Host = hs.req.Target.String()
	pr.Out.Host = pr.In.Host
	for _, k := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[k]; ok {
			pr.Out.Header[k] = v
		}
	}
}

// RoundTrip sends r to the endpoint the balancer prefers for this request, and to the next one
// when an endpoint cannot be reached (nothing of the request was sent yet).
func (hs *httpStream) RoundTrip(r *http.Request) (*http.Response, error) {
	dest, err := hs.destination(r)
	if err != nil {
		return nil, &noUpstream{err}
	}
	rt := routedOf(r.Context())
	body := &retryBody{rc: r.Body}
	var errs []error
	for _, ep := range dest.Candidates {
		out := *r
		u := *r.URL
		u.Host = ep.String() // once: the record and the noted destination take this string
		out.URL = &u
		if r.Body != nil && r.Body != http.NoBody {
			out.Body = body
		}
		t := hs.transport(r.ProtoMajor == 2)
		if t == nil {
			return nil, errors.New("waypoint: stream ended")
		}
		var resp *http.Response
		if rt != nil {
			hs.noteDest(u.Host, dest)
			resp, err = hs.roundTripRouted(rt, t, &out, body)
		} else {
			resp, err = t.RoundTrip(&out)
		}
		if err == nil {
			if rec, ok := r.Context().Value(recorderKey{}).(*recorder); ok {
				rec.upstream, rec.ep, rec.dest = u.Host, ep, dest
			}
			hs.h.Balancer.Started(ep)
			resp.Body = withDone(resp.Body, func() { hs.h.Balancer.Done(ep) })
			return resp, nil
		}
		var de *dialError
		if !errors.As(err, &de) || body.read {
			return nil, err
		}
		errs = append(errs, err)
	}
	return nil, &noUpstream{fmt.Errorf("every endpoint of %s failed: %w", dest.Service.Hostname, errors.Join(errs...))}
}

// transport is the stream's HTTP/1.1 or HTTP/2 (prior knowledge) client; nil once it ended.
func (hs *httpStream) transport(h2 bool) *http.Transport {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.ended {
		return nil
	}
	t := &hs.h1
	if h2 {
		t = &hs.h2
	}
	if *t == nil {
		var p http.Protocols
		if h2 {
			p.SetUnencryptedHTTP2(true)
		} else {
			p.SetHTTP1(true)
		}
		*t = &http.Transport{
			Protocols:              &p,
			DialContext:            hs.dial,
			DisableCompression:     true, // bytes pass as they are
			MaxIdleConnsPerHost:    8,
			IdleConnTimeout:        httpIdleTimeout,
			MaxResponseHeaderBytes: maxHeaderBytes,
			HTTP2:                  &http.HTTP2Config{},
		}
	}
	return *t
}

// dial opens (or takes the pre-dialed) onward stream to the endpoint addr.
func (hs *httpStream) dial(ctx context.Context, _, addr string) (net.Conn, error) {
	ep, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("waypoint: endpoint %q: %w", addr, err)
	}
	hs.mu.Lock()
	if pre := hs.pre; pre != nil && pre.Request().Target.String() == addr {
		hs.pre = nil
		hs.mu.Unlock()
		return pre, nil
	}
	routedDest := hs.dests[addr]
	hs.mu.Unlock()
	if routedDest != nil {
		return hs.h.dialEndpoint(ctx, hs.req, routedDest, ep)
	}
	dest, err := hs.h.Routes().Resolve(hs.req.Target.Addr, nil)
	if err != nil {
		return nil, &dialError{ep: ep, err: err}
	}
	return hs.h.dialEndpoint(ctx, hs.req, dest, ep)
}

func (hs *httpStream) close() {
	hs.mu.Lock()
	hs.ended = true
	pre, h1, h2 := hs.pre, hs.h1, hs.h2
	hs.pre = nil
	hs.mu.Unlock()
	hs.mirrorStop()
	hs.mirrorWG.Wait()
	if pre != nil {
		pre.Close()
	}
	for _, t := range []*http.Transport{h1, h2} {
		if t != nil {
			t.CloseIdleConnections()
		}
	}
}

// noUpstream: no endpoint could be reached (Envoy: 503, flag UH or UF).
type noUpstream struct{ err error }

func (e *noUpstream) Error() string { return "no healthy upstream: " + e.err.Error() }
func (e *noUpstream) Unwrap() error { return e.err }

// proxyError answers a request the upstream did not: 503 when no endpoint could be reached,
// 502 when one failed mid-way, nothing when the client went away.
func (hs *httpStream) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	rec, _ := w.(*recorder)
	var nu *noUpstream
	if code, flags, ok := routeStatus(r, err); ok {
		if rec != nil {
			rec.flags = flags
		}
		localReply(w, isGRPC(r), code, 4, "upstream request timeout")
		return
	}
	switch {
	case r.Context().Err() != nil:
		if rec != nil {
			rec.flags, rec.code = "DC", 499 // Envoy's code for a client that went away
		}
		return
	case errors.As(err, &nu):
		var de *dialError
		flags := "UH"
		if errors.As(err, &de) {
			flags = "UF"
		}
		if rec != nil {
			rec.flags = flags
		}
		hs.h.log().Debug("waypoint: no upstream for request", "target", hs.req.Target.String(), "path", r.URL.Path, "err", err)
		localReply(w, isGRPC(r), http.StatusServiceUnavailable, 14, "no healthy upstream")
	default:
		if rec != nil {
			rec.flags = "UC"
		}
		hs.h.log().Debug("waypoint: upstream failed", "target", hs.req.Target.String(), "path", r.URL.Path, "err", err)
		localReply(w, isGRPC(r), http.StatusBadGateway, 14, "upstream connect error or disconnect/reset before headers")
	}
}

// localReply answers from the waypoint itself, as Envoy does: text for HTTP, a trailers-only
// response (HTTP 200, grpc-status) for gRPC.
func localReply(w http.ResponseWriter, grpc bool, code, grpcCode int, msg string) {
	if grpc {
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Grpc-Status", fmt.Sprint(grpcCode))
		w.Header().Set("Grpc-Message", msg)
		w.WriteHeader(http.StatusOK)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(code)
	io.WriteString(w, msg)
}

func isGRPC(r *http.Request) bool {
	return strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
}

func grpcStatus(h http.Header) string {
	if v := h.Get("Grpc-Status"); v != "" {
		return v
	}
	return h.Get(http.TrailerPrefix + "Grpc-Status")
}

type recorderKey struct{}

// recorder notes the status a request got, without hiding the writer's other abilities
// (Flush, full duplex) from http.ResponseController.
type recorder struct {
	http.ResponseWriter
	code     int
	flags    string
	upstream string
	ep       netip.AddrPort     // the endpoint that answered, with dest
	dest     *route.Destination // nil when no endpoint answered
	routed   *routed            // where a route sent the request; nil when none did
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 && code >= 200 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// retryBody lets a request be offered to another endpoint when the first could not be reached:
// the transport closes the body it was given on failure, so Close is left to the server.
type retryBody struct {
	rc   io.ReadCloser
	read bool
}

func (b *retryBody) Read(p []byte) (int, error) {
	b.read = true
	return b.rc.Read(p)
}

func (b *retryBody) Close() error { return nil }

// doneBody calls done once, when the response body is closed (the request is over).
type doneBody struct {
	io.ReadCloser
	once sync.Once
	done func()
}

func (b *doneBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

// doneRWBody is a doneBody that stays writable: the body of a 101 Switching Protocols
// response is the upgraded connection, which ReverseProxy writes the client's bytes to.
type doneRWBody struct {
	*doneBody
	w io.Writer
}

func (b doneRWBody) Write(p []byte) (int, error) { return b.w.Write(p) }

// withDone wraps a response body so done runs once when it is closed.
func withDone(body io.ReadCloser, done func()) io.ReadCloser {
	d := &doneBody{ReadCloser: body, done: done}
	if w, ok := body.(io.Writer); ok {
		return doneRWBody{d, w}
	}
	return d
}

// servedConn tells when the HTTP server is done with the stream.
type servedConn struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func (c *servedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

// CloseWrite lets the HTTP/1 server half-close before it closes (the client reads the whole
// response before any reset).
func (c *servedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// oneConnListener hands one connection to an http.Server, then blocks until closed.
type oneConnListener struct {
	mu     sync.Mutex
	conn   net.Conn
	closed chan struct{}
	once   sync.Once
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.conn
	l.conn = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.closed
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return oneConnAddr{} }

type oneConnAddr struct{}

func (oneConnAddr) Network() string { return "hbone" }
func (oneConnAddr) String() string  { return "hbone" }

// forward proxies r upstream. HTTP/1 is made full duplex first, as Envoy: an upstream that
// answers while the request body is still arriving (an echo, a streaming upload) gets the rest of
// it. Without this, net/http's HTTP/1 server ends the request body at the first flushed response
// byte, the onward transport's body write fails and closes the upstream connection mid-response:
// the client saw its whole echo but no final chunk (unexpected EOF). Local answers (denials, 401)
// stay half duplex, so net/http drains the unread body and keeps the connection.
func (hs *httpStream) forward(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 {
		http.NewResponseController(w).EnableFullDuplex() // through the recorder's Unwrap
	}
	hs.fwd.ServeHTTP(w, r)
}
