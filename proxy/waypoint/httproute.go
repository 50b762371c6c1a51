package waypoint

import (
	"bytes"
	"context"
	"errors"

	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/route"
)

// maxRouteMirrors bounds the RequestMirror copies in flight per inbound stream; past it a copy
// is dropped, so a slow mirror never holds requests, memory or goroutines of the real path.
const maxRouteMirrors = 16

// errRouteTimeout is the cause of a request ended by its rule's timeouts.request (Envoy's 504, UT).
var errRouteTimeout = errors.New("waypoint: route timeout")

// routedKey carries a mirror's *routed; a client's request has it in its recorder (routedOf).
type routedKey struct{}

// routedOf is where a route sent the request of ctx; nil when no route did.
func routedOf(ctx context.Context) *routed {
	if rt, ok := ctx.Value(routedKey{}).(*routed); ok {
		return rt
	}
	if rec, ok := ctx.Value(recorderKey{}).(*recorder); ok {
		return rec.routed
	}
	return nil
}

// routed is where a route sent a request: its backend Service and what applies on the way.
type routed struct {
	ns, name string
	port     uint16
	rule     *httproute.Rule
	backend  *httproute.Backend
}

// routeHTTP applies the routes attached to the addressed service port, after authorization and
// the addressed service's sessions: it answers (404, 500, a redirect) or forwards to a backend
// (with that backend's own sessions) and reports true; false means no route applies, forward as
// before. The rule (proxy/README.md, "Routes and sessions"): sessions on the service the
// client addressed see the request as sent, before any route; sessions on a route's backend see
// what that backend would get, after the rule's filters.
func (hs *httpStream) routeHTTP(w *recorder, r *http.Request, path string, grpc bool) bool {
	if hs.h.HTTPRoutes == nil || hs.svc == "" || !hs.serviceAddressed() {
		return false
	}
	m, attached := hs.h.HTTPRoutes().Match(hs.svcNS, hs.svc, hs.port, r, path, grpc)
	if !attached {
		return false
	}
	rule := m.Rule
	switch {
	case rule == nil:
		w.flags = "NR"
		localReply(w, grpc, http.StatusNotFound, 12, "route not found")
		return true
	case rule.CORS.Preflight(r): // answered here, as Envoy's CORS filter does
		rule.CORS.Answer(w, r)
		return true
	case rule.Redirect != nil:
		rule.ResponseHeaders.Apply(w.Header())
		rule.CORS.Apply(w.Header(), r.Header.Get("Origin"))
		w.Header().Set("Location", rule.Redirect.Location(r, path, m.Prefix, hs.port))
		w.WriteHeader(rule.Redirect.Status)
		return true
	}
	b := rule.Pick(hs.h.intn)
	if b == nil || b.Invalid != "" {
		reason := "no backend has a weight"
		if b != nil {
			reason = b.Invalid
		}
		hs.h.log().Debug("waypoint: route has no valid backend", "route", rule.Route, "reason", reason)
		localReply(w, grpc, http.StatusInternalServerError, 13, "invalid backend")
		return true
	}
	rule.RequestHeaders.Apply(r.Header)
	path = rule.Rewrite.Apply(r, path, m.Prefix)
	b.RequestHeaders.Apply(r.Header)
	for i := range rule.Mirrors {
		if mi := &rule.Mirrors[i]; mi.Mirrored(hs.h.intn) {
			hs.routeMirror(r, mi)
		}
	}
	w.routed = &routed{ns: b.Namespace, name: b.Name, port: b.Port, rule: rule, backend: b} // routedOf finds it
	if rule.Timeout > 0 {
		ctx, cancel := context.WithTimeoutCause(r.Context(), rule.Timeout, errRouteTimeout)
		defer cancel()
		r = r.WithContext(ctx)
	}
	steal, mirrors := requestSessions(hs.h.Sessions.For(b.Namespace, b.Name, b.Port), r, path)
	if len(mirrors) > 0 {
		hs.mirrorRequest(r, path, mirrors)
	}
	if steal != nil {
		hs.stealRequest(w, r, path, steal)
	} else {
		hs.forward(w, r)
	}
	return true
}

// serviceAddressed: the stream names a VIP of its service. Routes attach to Services: a
// workload-addressed stream (a pod IP) is not routed, as in Istio.
func (hs *httpStream) serviceAddressed() bool {
	s := hs.h.Routes().Service(hs.svcNS, hs.svc)
	return s != nil && slices.Contains(s.VIPs, hs.req.Target.Addr.Addr().Unmap())
}

// routed: HTTPRoutes or GRPCRoutes attach to the service port req addresses by VIP, so its
// stream is parsed whatever the inspect mode or a whole-stream session would do: a route is
// never skipped by splicing the stream (a whole-stream steal or mirror then takes requests).
func (h *Handler) routed(req *hbone.Request, dest *route.Destination) bool {
	if h.HTTPRoutes == nil || dest == nil || dest.Service == nil || !slices.Contains(dest.Service.VIPs, req.Target.Addr.Addr().Unmap()) {
		return false
	}
	return h.HTTPRoutes().Attached(dest.Service.Namespace, dest.Service.Name, dest.Port.Port)
}

func (h *Handler) intn(n int) int {
	if h.RouteRand != nil {
		return h.RouteRand(n)
	}
	return rand.IntN(n)
}

// destination is where r goes: its route's backend, else the stream's target.
func (hs *httpStream) destination(r *http.Request) (*route.Destination, error) {
	if rt := routedOf(r.Context()); rt != nil {
		return hs.h.Routes().ResolveService(rt.ns, rt.name, rt.port, hs.h.Balancer)
	}
	return hs.h.Routes().Resolve(hs.req.Target.Addr, hs.h.Balancer)
}

// roundTripRouted is one try of r to ep, bounded by the rule's timeouts.backendRequest (the
// bound lasts until the response body is closed), and retried as the rule's retry says while
// nothing of a body was sent.
func (hs *httpStream) roundTripRouted(rt *routed, t http.RoundTripper, out *http.Request, body *retryBody) (*http.Response, error) {
	attempts := 1
	if p := rt.rule.Retry; p != nil && (out.Body == nil || out.Body == http.NoBody) {
		attempts += p.Attempts
	}
	for try := 1; ; try++ {
		req, cancel := out, context.CancelFunc(func() {})
		if d := rt.rule.BackendTimeout; d > 0 {
			var ctx context.Context
			ctx, cancel = context.WithTimeout(out.Context(), d)
			req = out.WithContext(ctx)
		}
		resp, err := t.RoundTrip(req)
		if err != nil {
			cancel()
			return nil, err
		}
		if try < attempts && rt.rule.Retry.Retriable(resp.StatusCode) && !body.read {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			cancel()
			if d := rt.rule.Retry.Backoff; d > 0 {
				select {
				case <-time.After(d):
				case <-out.Context().Done():
					return nil, out.Context().Err()
				}
			}
			continue
		}
		resp.Body = withDone(resp.Body, cancel)
		rt.rule.ResponseHeaders.Apply(resp.Header)
		rt.backend.ResponseHeaders.Apply(resp.Header)
		rt.rule.CORS.Apply(resp.Header, out.Header.Get("Origin"))
		return resp, nil
	}
}

// routeMirror sends a copy of r to the mirror's Service once r's body has passed (bodies over
// session.MaxMirrorBody are not copied), at most maxRouteMirrors at a time per stream; its
// response is discarded and it is bounded by mirrorTimeout and the stream's end.
func (hs *httpStream) routeMirror(r *http.Request, m *httproute.MirrorAction) {
	select {
	case hs.mirrorSlots <- struct{}{}:
	default:
		hs.h.log().Debug("waypoint: route mirror dropped: too many in flight", "mirror", m.Namespace+"/"+m.Name)
		return
	}
	hdr := r.Header.Clone()
	for _, k := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"} {
		hdr.Del(k)
	}
	method, host, uri, h2 := r.Method, r.Host, r.URL.RequestURI(), r.ProtoMajor == 2
	rt := &routed{ns: m.Namespace, name: m.Name, port: m.Port, rule: &httproute.Rule{}, backend: &httproute.Backend{}}
	dispatch := func(body []byte, ok bool) {
		if !ok || !hs.goMirror(func(ctx context.Context) {
			ctx, cancel := context.WithTimeout(context.WithValue(ctx, routedKey{}, rt), mirrorTimeout)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, method, "http://"+hs.req.Target.String()+uri, bytes.NewReader(body))
			if err != nil {
				return
			}
			req.Header, req.Host = hdr, host
			if h2 {
				req.ProtoMajor, req.ProtoMinor = 2, 0
			}
			resp, err := hs.RoundTrip(req)
			if err != nil {
				hs.h.log().Debug("waypoint: route mirror failed", "mirror", m.Namespace+"/"+m.Name, "err", err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}) {
			<-hs.mirrorSlots
		}
	}
	if r.Body == nil || r.Body == http.NoBody {
		dispatch(nil, true)
		return
	}
	r.Body = &mirrorBody{ReadCloser: r.Body, done: dispatch}
}

// goMirror runs f on a goroutine the stream owns (it ends with the stream); false once the
// stream ended. f's slot is given back when it returns.
func (hs *httpStream) goMirror(f func(ctx context.Context)) bool {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.ended {
		return false
	}
	hs.mirrorWG.Add(1)
	go func() {
		defer hs.mirrorWG.Done()
		defer func() { <-hs.mirrorSlots }()
		f(hs.mirrorCtx)
	}()
	return true
}

// routeStatus maps an error of a routed request to Envoy's answer, when it is a route's own.
func routeStatus(r *http.Request, err error) (code int, flags string, ok bool) {
	if errors.Is(context.Cause(r.Context()), errRouteTimeout) || errors.Is(err, context.DeadlineExceeded) {
		if routedOf(r.Context()) != nil {
			return http.StatusGatewayTimeout, "UT", true
		}
	}
	return 0, "", false
}

// noteDest remembers which backend an endpoint was picked for, so its dial checks that
// noteDest remembers which backend an endpoint (ip:port) was picked for, so its dial checks that
func (hs *httpStream) noteDest(ep string, dest *route.Destination) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if old := hs.dests[ep]; old != nil && old.Service == dest.Service && old.Port == dest.Port {
		return // the usual case: the same service and port, request after request (what a dial checks)
	}
	if hs.dests == nil || len(hs.dests) >= maxNotedDests {
		hs.dests = map[string]*route.Destination{}
	}
	hs.dests[ep] = dest
}

const maxNotedDests = 1024
