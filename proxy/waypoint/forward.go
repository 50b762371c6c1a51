package waypoint

import (
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"

	"golang.org/x/net/http/httpguts"
)

// forwarder sends an inbound request on with rt and copies the answer back: the job of
// httputil.ReverseProxy, with what it does per request that the waypoint does not need left out.
// ReverseProxy clones each request twice (Request.Clone, then WithContext for its trace), copies
// the header map, starts a timer goroutine per streamed response to flush its headers, and
// allocated a 32 KiB copy buffer per request (BENCHMARKS.md, issue 21 goal 5). Here the
// outbound request is one shallow copy sharing the inbound header map (copied only when a
// hop-by-hop header must go), the copy buffer is pooled, and a response of known length is
// written with as few flushes as its arrival allows.
//
// Kept from ReverseProxy, as Envoy does them too: hop-by-hop headers (RFC 9110 7.6.1, and any
// header the Connection header names) are not forwarded either way, "TE: trailers" is (gRPC
// needs it); request trailers stream after the body; response trailers, announced or not, are
// passed on; 1xx responses (100 Continue, 103 Early Hints) are relayed; an error before the
// response goes to onError, one while copying the body aborts the client's response
// (http.ErrAbortHandler). An Upgrade request (WebSocket, h2c) goes through upgrade, a
// ReverseProxy, whose 101 handling (hijacking both ends) is kept as it is. A request's query
// is passed on as sent (ReverseProxy drops query parameters it cannot parse; Envoy does not).
type forwarder struct {
	rt      http.RoundTripper
	target  string // the outbound URL's host; rt picks the endpoint
	onError func(http.ResponseWriter, *http.Request, error)
	upgrade http.Handler // Upgrade requests
}

// hopHeaders are the headers that belong to one connection (RFC 9110 7.6.1, with the ones
// RFC 2616 13.5.1 listed, as ReverseProxy removes them).
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// forwardState is what one forwarded request needs beyond its copy: one allocation.
type forwardState struct {
	w     http.ResponseWriter
	mu    sync.Mutex // guards done against Got1xxResponse, which the transport calls on its goroutine
	done  bool       // the round trip returned: w's header map is the response's now
	trace httptrace.ClientTrace
}

func (s *forwardState) got1xx(code int, header textproto.MIMEHeader) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return nil
	}
	h := s.w.Header()
	for k, vv := range header {
		h[k] = append(h[k], vv...)
	}
	s.w.WriteHeader(code)
	clear(h) // a 1xx's headers are not the final response's
	return nil
}

func (f *forwarder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") != "" && httpguts.HeaderValuesContainsToken(r.Header["Connection"], "Upgrade") {
		f.upgrade.ServeHTTP(w, r)
		return
	}
	st := &forwardState{w: w}
	st.trace.Got1xxResponse = st.got1xx
	out := r.WithContext(httptrace.WithClientTrace(r.Context(), &st.trace))
	u := *r.URL
	u.Scheme, u.Host = "http", f.target
	out.URL, out.RequestURI, out.Close = &u, "", false
	if r.ContentLength == 0 {
		out.Body = nil // nothing to send; a nil body lets the transport retry on a stale connection
	}
	out.Header = outboundHeader(r.Header)
	resp, err := f.rt.RoundTrip(out)
	st.mu.Lock()
	st.done = true
	st.mu.Unlock()
	if err != nil {
		f.onError(w, out, err)
		return
	}
	f.respond(w, resp)
}

// outboundHeader is h without its hop-by-hop headers; h itself when it has none.
func outboundHeader(h http.Header) http.Header {
	te, hop := h["Te"], false
	for _, k := range hopHeaders {
		if _, ok := h[k]; ok && (k != "Te" || len(te) != 1 || te[0] != "trailers") {
			hop = true
			break
		}
	}
	_, ua := h["User-Agent"]
	if !hop && ua {
		return h
	}
	out := h.Clone()
	removeHopHeaders(out)
	if httpguts.HeaderValuesContainsToken(te, "trailers") {
		out["Te"] = []string{"trailers"}
	}
	if !ua {
		out["User-Agent"] = []string{""} // the transport's own is not the client's
	}
	return out
}

// removeHopHeaders deletes the headers the Connection header names, then hopHeaders.
func removeHopHeaders(h http.Header) {
	for _, v := range h["Connection"] {
		for name := range strings.SplitSeq(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, k := range hopHeaders {
		delete(h, k)
	}
}

// respond writes resp to w: headers (trailers announced), the body, then the trailers.
func (f *forwarder) respond(w http.ResponseWriter, resp *http.Response) {
	removeHopHeaders(resp.Header)
	h := w.Header()
	for k, vv := range resp.Header {
		if h[k] == nil {
			h[k] = vv // resp is this request's alone: its slices need no copy
		} else {
			h[k] = append(h[k], vv...)
		}
	}
	announced := len(resp.Trailer)
	if announced > 0 {
		names := make([]string, 0, announced)
		for k := range resp.Trailer {
			names = append(names, k)
		}
		h.Add("Trailer", strings.Join(names, ", "))
	}
	w.WriteHeader(resp.StatusCode)
	if err := copyBody(w, resp); err != nil {
		resp.Body.Close()
		panic(http.ErrAbortHandler) // the client's response is cut, as the upstream's was
	}
	resp.Body.Close() // fills resp.Trailer
	if len(resp.Trailer) > 0 {
		http.NewResponseController(w).Flush() // chunked, so the trailers can follow
	}
	if len(resp.Trailer) == announced {
		for k, vv := range resp.Trailer {
			h[k] = append(h[k], vv...)
		}
		return
	}
	for k, vv := range resp.Trailer {
		for _, v := range vv {
			h.Add(http.TrailerPrefix+k, v)
		}
	}
}

// copyBody copies resp's body to w through a pooled buffer. A streamed response (no length:
// gRPC, chunked; or text/event-stream) has its headers and every piece flushed at once, as
// ReverseProxy flushes them; one of known length is flushed only when the upstream paused
// before its end (a short read with bytes still to come), so a small response leaves in the
// one write the server makes when the handler returns.
func copyBody(w http.ResponseWriter, resp *http.Response) error {
	rc := http.NewResponseController(w)
	streamed := resp.ContentLength < 0 || isEventStream(resp.Header.Get("Content-Type"))
	if streamed {
		rc.Flush()
	}
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	var sent int64
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, err := w.Write(buf[:n]); err != nil {
				return err
			}
			sent += int64(n)
			more := rerr == nil && (streamed || (n < len(buf) && sent < resp.ContentLength))
			if more {
				rc.Flush()
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// isEventStream: a Content-Type of text/event-stream (Server-Sent Events), parameters aside.
func isEventStream(ct string) bool {
	ct, _, _ = strings.Cut(ct, ";")
	return strings.EqualFold(strings.TrimSpace(ct), "text/event-stream")
}
