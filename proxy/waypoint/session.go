package waypoint

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/sniff"
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

// stealStream sends a whole stream to st's developer (session.Take): the addressed service's
// steal, or its route's backend's. handled is false when the developer could not be reached:
// the caller forwards the stream as usual.
func (h *Handler) stealStream(s *hbone.Stream, in net.Conn, p *plan, st *session.Session, proto sniff.Protocol) (handled bool, err error) {
	req := p.req
	m := tunnel.Meta{Kind: tunnel.KindTCP, Target: req.Target.String(), Source: authz.Principal(req.PeerID.String())}
	var rec *streamRecord
	accept := func() error {
		if err := s.Accept(); err != nil { // idempotent: an inspected stream was accepted to be sniffed
			return err
		}
		rec = h.openRecord(req, p.dest, proto, "developer")
		return nil
	}
	handled, counts, err := st.Take(s.Context(), in, m, accept, h.HalfCloseTimeout)
	if !handled {
		h.log().Debug("waypoint: session unreachable, forwarding to the service", "session", st.ID, "err", err)
		return false, nil
	}
	if rec != nil {
		rec.close(counts, err)
	}
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

// mirrorStream tees in to each mirror that has a slot free (session.TryMirror: bounded per
// session and per developer; a copy without one is dropped and counted). Each copy runs in a
// goroutine its session owns, so it ends with the session, not only with the stream.
// The stream's context (unused) does not bound the copies: the developer gets the whole copy of a
// stream that just ended.
func (h *Handler) mirrorStream(_ context.Context, in net.Conn, req *hbone.Request, mirrors []*session.Session) net.Conn {
	t := &mirrorTee{Conn: in}
	source := authz.Principal(req.PeerID.String())
	meta := tunnel.Meta{Kind: tunnel.KindTCP, Target: req.Target.String(), Source: source}
	for _, m := range mirrors {
		if !m.TryMirror() {
			continue
		}
		sink := &mirrorSink{st: m, wake: make(chan struct{}, 1)}
		if !m.Go(func(ctx context.Context) { defer m.MirrorDone(); sink.run(ctx, meta) }) {
			m.MirrorDone() // the session just ended
			continue
		}
		t.sinks = append(t.sinks, sink)
	}
	if len(t.sinks) == 0 {
		return in
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

// run opens the developer's copy and feeds it until the client's stream ends, the copy is
// abandoned, or the session ends (ctx). After the client's EOF it waits at most mirrorTimeout for
// the developer's side to finish, so a developer that never closes holds its slot no longer.
func (m *mirrorSink) run(ctx context.Context, meta tunnel.Meta) {
	defer m.stop()
	dev, err := m.st.Open(ctx, meta)
	if err != nil {
		m.abandon()
		return
	}
	answered := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer dev.Close()                                           // resets the copy unless it finished; ends the reader
	wg.Go(func() { io.Copy(io.Discard, dev); close(answered) }) // the developer's answers go nowhere
	for {
		select {
		case <-m.wake:
		case <-ctx.Done():
			return
		}
		m.mu.Lock()
		bufs, bad, ended, eof := m.buf, m.bad, m.ended, m.eof
		m.buf, m.size = nil, 0
		m.mu.Unlock()
		if bad {
			return
		}
		if !m.send(ctx, dev, bufs) {
			m.abandon()
			return
		}
		if !ended {
			continue
		}
		if eof {
			if cw, ok := dev.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
			m.st.Report(tunnel.Event{Kind: tunnel.EventStream, Received: m.sent, Source: meta.Source})
			timer := time.NewTimer(mirrorTimeout)
			defer timer.Stop()
			select {
			case <-answered:
			case <-timer.C:
			case <-ctx.Done():
			}
		}
		return
	}
}

// send writes bufs to the developer; a write blocked by a developer that does not read ends when
// the session does.
func (m *mirrorSink) send(ctx context.Context, dev net.Conn, bufs [][]byte) bool {
	stop := context.AfterFunc(ctx, func() { dev.Close() })
	defer stop()
	for _, b := range bufs {
		n, err := dev.Write(b)
		m.sent += int64(n)
		if err != nil {
			return false
		}
	}
	return true
}

// stop makes the tee's further writes no-ops once run returned.
func (m *mirrorSink) stop() {
	m.mu.Lock()
	m.bad = true
	m.buf, m.size = nil, 0
	m.mu.Unlock()
}

// abandon gives up the copy (counted as dropped); the real stream goes on.
func (m *mirrorSink) abandon() {
	m.stop()
	m.st.Dropped()
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
		BufferPool:    copyBuffers,
		ErrorHandler:  hs.proxyError,
		ErrorLog:      hs.proxy.ErrorLog,
	}
	rp.ServeHTTP(w, r)
	if w.upstream == "developer" {
		code := w.code
		if code == 0 {
			code = http.StatusOK
		}
		st.Report(tunnel.Event{Kind: tunnel.EventRequest, Method: r.Method, Path: path, Status: code,
			Micros: time.Since(start).Microseconds(), Source: authz.Principal(hs.labels.Source.Principal)})
	}
}

type stealTransport struct {
	hs *httpStream
	st *session.Session
}

func (t *stealTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	tr := t.st.Transport(r.ProtoMajor == 2)
	if tr == nil || t.st.Unreachable() { // the session just ended, or its developer is not answering
		return t.hs.RoundTrip(r)
	}
	body := &retryBody{rc: r.Body}
	ctx, cancel := context.WithCancel(r.Context())
	out := r.WithContext(ctx)
	if r.Body != nil && r.Body != http.NoBody {
		out.Body = body
	}
	// A reused connection to the developer has no Ack: while the response does not come, the
	// session probes the developer's side, and a failed probe ends this attempt.
	stop := t.st.Watch(cancel)
	resp, err := tr.RoundTrip(out)
	if gone := stop(); gone && err == nil {
		resp.Body.Close()
		resp, err = nil, context.Canceled
	}
	if err == nil {
		if rec, ok := r.Context().Value(recorderKey{}).(*recorder); ok {
			rec.upstream = "developer"
		}
		resp.Body = withDone(resp.Body, cancel)
		return resp, nil
	}
	cancel()
	var oe *tunnel.OpenError
	if (errors.As(err, &oe) || t.st.Unreachable()) && !body.read {
		// Nothing reached the developer, or the developer vanished before answering: the real
		// service answers.
		return t.hs.RoundTrip(r)
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
	source := authz.Principal(hs.labels.Source.Principal)
	dispatch := func(body []byte, ok bool) {
		for _, m := range ms {
			if !ok {
				m.Dropped()
				m.MirrorDone()
				continue
			}
			started := m.Go(func(ctx context.Context) {
				defer m.MirrorDone()
				ctx, cancel := context.WithTimeout(ctx, mirrorTimeout)
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
				ev := tunnel.Event{Kind: tunnel.EventRequest, Method: method, Path: path, Source: source}
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
			})
			if !started {
				m.MirrorDone() // the session just ended
			}
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
