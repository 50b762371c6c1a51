package waypoint

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Debug sessions on the data path. A session that takes whole streams steals (or copies) every
// stream the waypoint does not parse; any session on an inspected HTTP stream is matched request
// by request. Whatever fails on the developer's side before a byte of the request went there
// falls back to the real service: a session that ends never fails the traffic it did not take.

// mirrorStreamBuffer bounds the bytes of one stream waiting for a slow developer; past it the
// copy is abandoned (counted as dropped) and the real stream goes on untouched.
const mirrorStreamBuffer = 256 << 10

// mirrorTimeout bounds one mirrored request.
const mirrorTimeout = 30 * time.Second

func (h *Handler) sessionsFor(dest *route.Destination) []*session.Session {
	if h.Sessions == nil || dest == nil || dest.Service == nil {
		return nil
	}
	return h.Sessions.For(dest.Service.Namespace, dest.Service.Name, dest.Port.Port)
}

func filtered(ss []*session.Session) bool {
	for _, s := range ss {
		if !s.Whole() {
			return true
		}
	}
	return false
}

// whole returns the whole-stream steal (at most one: the registry refuses a second) and the
// whole-stream mirrors.
func whole(ss []*session.Session) (steal *session.Session, mirrors []*session.Session) {
	for _, s := range ss {
		switch {
		case !s.Whole():
		case s.Spec.Mode == session.Steal:
			steal = s
		default:
			mirrors = append(mirrors, s)
		}
	}
	return steal, mirrors
}

// stealStream sends a whole stream to the developer. handled is false when the developer could
// not be reached: the caller forwards the stream as usual.
func (h *Handler) stealStream(s *hbone.Stream, in net.Conn, req *hbone.Request, st *session.Session) (handled bool, err error) {
	source := strings.TrimPrefix(req.PeerID.String(), "spiffe://")
	dev, err := st.Open(s.Context(), tunnel.Meta{Kind: "tcp", Target: req.Target.String(), Source: source})
	if err != nil {
		h.log().Debug("waypoint: session unreachable, forwarding to the service", "session", st.ID, "err", err)
		return false, nil
	}
	if err := s.Accept(); err != nil { // idempotent when the stream was accepted to be sniffed
		dev.Close()
		return true, err
	}
	start := time.Now()
	counts, err := hbone.SpliceCount(in, dev, h.HalfCloseTimeout)
	ev := tunnel.Event{Kind: "stream", Received: counts.AToB, Sent: counts.BToA, Micros: time.Since(start).Microseconds(), Source: source}
	if err != nil {
		ev.Error = err.Error()
	}
	st.Report(ev)
	return true, err
}

// mirrorTee copies what the client sends to each whole-stream mirror as it passes.
type mirrorTee struct {
	net.Conn
	sinks []*mirrorSink
}

func (t *mirrorTee) Read(p []byte) (int, error) {
	n, err := t.Conn.Read(p)
	for _, s := range t.sinks {
		if n > 0 {
			s.write(p[:n])
		}
		if err != nil {
			s.end(err == io.EOF)
		}
	}
	return n, err
}

func (t *mirrorTee) CloseWrite() error {
	if cw, ok := t.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (t *mirrorTee) Close() error {
	for _, s := range t.sinks {
		s.end(false)
	}
	return t.Conn.Close()
}

// mirrorSink feeds one developer's copy of a stream from a bounded buffer; the developer's
// answers are read and discarded.
type mirrorSink struct {
	st    *session.Session
	mu    sync.Mutex
	buf   [][]byte
	size  int
	eof   bool // the client finished: half-close the copy once drained
	ended bool // no more data will come
	bad   bool // abandoned: too slow, or unreachable
	wake  chan struct{}
	sent  int64
}

func (h *Handler) mirrorStream(ctx context.Context, in net.Conn, req *hbone.Request, mirrors []*session.Session) net.Conn {
	if len(mirrors) == 0 {
		return in
	}
	t := &mirrorTee{Conn: in}
	source := strings.TrimPrefix(req.PeerID.String(), "spiffe://")
	for _, m := range mirrors {
		sink := &mirrorSink{st: m, wake: make(chan struct{}, 1)}
		t.sinks = append(t.sinks, sink)
		go sink.run(context.WithoutCancel(ctx), tunnel.Meta{Kind: "tcp", Target: req.Target.String(), Source: source})
	}
	return t
}

func (m *mirrorSink) write(p []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.bad || m.ended {
		return
	}
	if m.size+len(p) > mirrorStreamBuffer {
		m.bad = true
		m.buf, m.size = nil, 0
		m.st.Dropped()
	} else {
		m.buf = append(m.buf, bytes.Clone(p))
		m.size += len(p)
	}
	m.poke()
}

func (m *mirrorSink) end(eof bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.ended {
		m.ended, m.eof = true, eof
		m.poke()
	}
}

func (m *mirrorSink) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *mirrorSink) run(ctx context.Context, meta tunnel.Meta) {
	dev, err := m.st.Open(ctx, meta)
	if err != nil {
		m.mu.Lock()
		m.bad = true
		m.mu.Unlock()
		m.st.Dropped()
		return
	}
	defer dev.Close()
	go io.Copy(io.Discard, dev) // the developer's answers go nowhere
	for range m.wake {
		m.mu.Lock()
		bufs, bad, ended, eof := m.buf, m.bad, m.ended, m.eof
		m.buf, m.size = nil, 0
		m.mu.Unlock()
		if bad {
			return // the deferred Close resets the copy
		}
		for _, b := range bufs {
			n, err := dev.Write(b)
			m.sent += int64(n)
			if err != nil {
				m.mu.Lock()
				m.bad = true
				m.mu.Unlock()
				m.st.Dropped()
				return
			}
		}
		if ended {
			if eof {
				if cw, ok := dev.(interface{ CloseWrite() error }); ok {
					cw.CloseWrite()
				}
				m.st.Report(tunnel.Event{Kind: "stream", Received: m.sent, Source: meta.Source})
				io.Copy(io.Discard, dev)
			}
			return
		}
	}
}

// requestSessions splits the sessions an HTTP request matches: the steal (the first that
// matches) and the mirrors.
func requestSessions(ss []*session.Session, r *http.Request, path string) (steal *session.Session, mirrors []*session.Session) {
	for _, s := range ss {
		if !s.Match(r, path) {
			continue
		}
		if s.Spec.Mode == session.Steal {
			if steal == nil {
				steal = s
			}
		} else {
			mirrors = append(mirrors, s)
		}
	}
	return steal, mirrors
}

// stealRequest sends r to the developer's app; if the developer cannot be reached before the
// request went, it goes to the real service instead.
func (hs *httpStream) stealRequest(w *recorder, r *http.Request, path string, st *session.Session) {
	start := time.Now()
	rp := &httputil.ReverseProxy{
		Rewrite:       hs.rewrite,
		Transport:     &stealTransport{hs: hs, st: st},
		FlushInterval: -1,
		ErrorHandler:  hs.proxyError,
		ErrorLog:      hs.proxy.ErrorLog,
	}
	rp.ServeHTTP(w, r)
	if w.upstream == "developer" {
		code := w.code
		if code == 0 {
			code = http.StatusOK
		}
		st.Report(tunnel.Event{Kind: "request", Method: r.Method, Path: path, Status: code,
			Micros: time.Since(start).Microseconds(), Source: hs.labels.SourcePrincipal})
	}
}

type stealTransport struct {
	hs *httpStream
	st *session.Session
}

func (t *stealTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	tr := t.st.Transport(r.ProtoMajor == 2)
	if tr == nil { // the session just ended
		return t.hs.RoundTrip(r)
	}
	body := &retryBody{rc: r.Body}
	out := *r
	if r.Body != nil && r.Body != http.NoBody {
		out.Body = body
	}
	resp, err := tr.RoundTrip(&out)
	if err == nil {
		if rec, ok := r.Context().Value(recorderKey{}).(*recorder); ok {
			rec.upstream = "developer"
		}
		return resp, nil
	}
	var oe *tunnel.OpenError
	if errors.As(err, &oe) && !body.read {
		return t.hs.RoundTrip(r) // nothing reached the developer: the real service answers
	}
	return nil, err
}

// mirrorRequest arranges for a copy of r to reach each mirror once its body has passed (bodies
// over session.MaxMirrorBody are not copied). The real request is never held up.
func (hs *httpStream) mirrorRequest(r *http.Request, path string, mirrors []*session.Session) {
	var ms []*session.Session
	for _, m := range mirrors {
		if m.TryMirror() {
			ms = append(ms, m)
		}
	}
	if len(ms) == 0 {
		return
	}
	hdr := r.Header.Clone()
	for _, k := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"} {
		hdr.Del(k)
	}
	method, host, uri, h2 := r.Method, r.Host, r.URL.RequestURI(), r.ProtoMajor == 2
	source := hs.labels.SourcePrincipal
	dispatch := func(body []byte, ok bool) {
		for _, m := range ms {
			if !ok {
				m.Dropped()
				m.MirrorDone()
				continue
			}
			go func() {
				defer m.MirrorDone()
				ctx, cancel := context.WithTimeout(context.Background(), mirrorTimeout)
				defer cancel()
				req, err := http.NewRequestWithContext(ctx, method, "http://"+m.Host+uri, bytes.NewReader(body))
				if err != nil {
					return
				}
				req.Header, req.Host = hdr.Clone(), host
				tr := m.Transport(h2)
				if tr == nil {
					return
				}
				ev := tunnel.Event{Kind: "request", Method: method, Path: path, Source: source}
				start := time.Now()
				resp, err := tr.RoundTrip(req)
				if err != nil {
					m.Dropped()
					ev.Error = err.Error()
				} else {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					ev.Status = resp.StatusCode
				}
				ev.Micros = time.Since(start).Microseconds()
				m.Report(ev)
			}()
		}
	}
	if r.Body == nil || r.Body == http.NoBody {
		dispatch(nil, true)
		return
	}
	r.Body = &mirrorBody{ReadCloser: r.Body, done: dispatch}
}

// mirrorBody keeps a copy of a request body as it is read; at its end the copy goes out.
type mirrorBody struct {
	io.ReadCloser
	buf  bytes.Buffer
	over bool
	once sync.Once
	done func(body []byte, ok bool)
}

func (b *mirrorBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if !b.over {
		if b.buf.Len()+n > session.MaxMirrorBody {
			b.over = true
			b.buf = bytes.Buffer{}
		} else {
			b.buf.Write(p[:n])
		}
	}
	if err == io.EOF {
		b.once.Do(func() { b.done(b.buf.Bytes(), !b.over) })
	}
	return n, err
}

func (b *mirrorBody) Close() error {
	b.once.Do(func() { b.done(nil, false) }) // closed before its end: no complete copy
	return b.ReadCloser.Close()
}
