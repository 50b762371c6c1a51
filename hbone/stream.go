package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

var errDeadline = os.ErrDeadlineExceeded

// Stream is one CONNECT tunnel: a net.Conn whose bytes travel as DATA frames of one HTTP/2
// stream. CloseWrite sends END_STREAM (a TCP FIN) while reads go on; Close ends both directions,
// with RST_STREAM if the peer was still sending. Reset aborts the stream with a code.
//
// Read and Write may be called concurrently with each other; like a net.Conn, each should be
// called from one goroutine at a time.
type Stream struct {
	c      *conn // immutable
	req    *Request
	id     uint32 // immutable
	status int32  // client: the response status, valid once respCh is closed

	sentEnd    bool // guarded by c.mu: END_STREAM queued (or a final status sent)
	recvEnded  bool // guarded by c.mu: END_STREAM received
	responded  bool // guarded by c.mu: client: final response headers received
	pokeLater  bool // owned by the reader: in c.pokes
	endWritten bool // owned by the writer: END_STREAM is on the wire
	rstWritten bool // owned by the writer: RST_STREAM is on the wire, later frames are dropped
	closed     bool // guarded by mu: Close was called
	ended      bool // guarded by mu: the stream is gone from its connection; Context is done

	// Guarded by c.mu.
	sendWin     int64
	recvWin     int64
	recvUnacked int64
	early, late int64 // unread bytes whose connection window was returned on arrival / is still held
	werr        error // writes fail with this once set
	born        int64 // immutable once opened: unix nanos of the frame that opened it
	// winCh is poked when the send window grows or the stream fails; made by the first writer
	// that waits for window (most streams never do).
	winCh chan struct{}

	// Receive buffer, guarded by mu. The channels are made only when someone waits on them: an
	// idle spliced stream has no reader waiting and no Context asked for (README, "Idle streams").
	mu       sync.Mutex
	chunks   []*chunk
	rerr     error         // io.EOF after END_STREAM, or why the stream failed
	readable chan struct{} // poked when chunks or rerr change; made by the first Read that waits
	done     chan struct{} // Context().Done(), made when asked; closed when the stream ends
	afters   *afterFunc    // context.AfterFunc callbacks to start when the stream ends

	wmu sync.Mutex // serializes Write and CloseWrite

	rdl, wdl deadline

	respCh   chan struct{} // client, guarded by c.mu: closed on the final response; nil once roundTrip saw it
	srv      *Server       // server: the server running its handler (immutable once set)
	accepted atomic.Bool   // server: the 200 was queued
	detached atomic.Bool   // server: the handler handed the stream's end to Detach's release
	released atomic.Bool   // server: Detach's release ran
	closeMu  sync.Once
	onClose  func() // optional: releases what the stream runs over (double HBONE)

	// onReadable, when set, is poked (from the connection's reader, so it must not block) each
	// time bytes or an end arrive: Splice drains an idle direction without parking a goroutine.
	onReadable atomic.Pointer[drainer]
}

func newStream(c *conn, id uint32) *Stream {
	return &Stream{c: c, id: id}
}

// Detach lets a server Handler return before the stream ends without the server answering or
// closing it: once ServeHBONE returns, the stream's end is whoever holds release, which must be
// called exactly once with the handler's result (mapped as if ServeHBONE had returned it: a
// status if the stream was never accepted, a reset for an error, then Close). Until release the
// server counts the stream as running (Shutdown waits for it). A long idle stream then holds no
// goroutine stack (see SpliceAsync). Detach must be called from ServeHBONE, at most once; what
// ServeHBONE returns after it is not used (release's argument is). On a stream no Server runs a
// handler for (a dialed one) it returns nil.
func (s *Stream) Detach() (release func(error)) {
	if s.srv == nil || !s.detached.CompareAndSwap(false, true) {
		return nil
	}
	return s.release
}

func (s *Stream) release(err error) {
	if s.released.CompareAndSwap(false, true) {
		s.srv.finishStream(s, err)
	}
}

// Request is the CONNECT this stream answers (server) or made (client).
func (s *Stream) Request() *Request { return s.req }

// ID is the HTTP/2 stream ID.
func (s *Stream) ID() uint32 { return s.id }

// Context is cancelled when the stream ends: both sides done, reset, or the connection lost.
// It is the stream itself (streamContext), so asking for it costs nothing; its Done channel is
// made on the first call.
func (s *Stream) Context() context.Context { return (*streamContext)(s) }

// LocalAddr and RemoteAddr are the addresses of the connection the stream runs on.
func (s *Stream) LocalAddr() net.Addr  { return s.c.nc.LocalAddr() }
func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

func (s *Stream) SetDeadline(t time.Time) error {
	s.rdl.set(t)
	s.wdl.set(t)
	return nil
}
func (s *Stream) SetReadDeadline(t time.Time) error  { s.rdl.set(t); return nil }
func (s *Stream) SetWriteDeadline(t time.Time) error { s.wdl.set(t); return nil }

// Accept answers the CONNECT with 200. A server Handler calls it once the stream can be served,
// that is after its upstream dial succeeded; Write before Accept fails.
func (s *Stream) Accept() error {
	if !s.c.srv {
		return errors.New("hbone: Accept on a client stream")
	}
	if s.accepted.Swap(true) {
		return nil
	}
	s.c.mu.Lock()
	err := s.writeErrLocked()
	s.c.mu.Unlock()
	if err != nil {
		return err
	}
	s.c.queueOrdered(writeItem{kind: wHeaders, s: s, id: s.id, fields: statusFields(http.StatusOK)})
	return nil
}

func statusFields(code int) []hpack.HeaderField {
	return []hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(code)}}
}

// respond sends a final non-200 status with END_STREAM and ends the stream; if the client was
// still sending, RST_STREAM(NO_ERROR) tells it to stop (RFC 9113 section 8.1).
func (s *Stream) respond(code int) {
	c := s.c
	c.mu.Lock()
	if c.streams[s.id] != s || s.sentEnd {
		c.mu.Unlock()
		return
	}
	s.sentEnd = true
	s.werr = &StatusError{Code: code}
	recvEnded := s.recvEnded
	c.removeLocked(s)
	c.mu.Unlock()
	s.accepted.Store(true)
	c.queueOrdered(writeItem{kind: wHeaders, s: s, id: s.id, fields: statusFields(code), end: true})
	if !recvEnded {
		c.queueOrdered(writeItem{kind: wRST, s: s, id: s.id, code: http2.ErrCodeNo})
	}
	s.fail(&StatusError{Code: code})
}

func (s *Stream) writeErrLocked() error {
	if s.werr != nil {
		return s.werr
	}
	if s.sentEnd {
		return ErrStreamClosed
	}
	return nil
}

// pokeWindowLocked wakes a writer waiting for window; the caller holds c.mu.
func (s *Stream) pokeWindowLocked() {
	poke(s.winCh)
}

// winChLocked is the channel a writer waits on for window; the caller holds c.mu, under which
// it checked the window, so a later change (also under c.mu) finds the channel and pokes it.
func (s *Stream) winChLocked() chan struct{} {
	if s.winCh == nil {
		s.winCh = make(chan struct{}, 1)
	}
	return s.winCh
}

func (s *Stream) pokeRead() {
	s.mu.Lock()
	ch := s.readable
	s.mu.Unlock()
	poke(ch)
	if d := s.onReadable.Load(); d != nil {
		d.poke()
	}
}

// readableLocked is the channel a reader waits on; the caller holds mu, under which it found
// nothing to read, so whatever arrives later (under mu too) finds the channel and pokes it.
func (s *Stream) readableLocked() chan struct{} {
	if s.readable == nil {
		s.readable = make(chan struct{}, 1)
	}
	return s.readable
}

// poke is a non-blocking send on a buffered channel; nil means nobody ever waited.
func poke(ch chan struct{}) {
	if ch == nil {
		return
	}
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Write sends p as DATA frames, as flow control allows. It returns once the writer has taken
// all of p, so p may be reused.
func (s *Stream) Write(p []byte) (int, error) {
	n, err := s.WriteBuffers(net.Buffers{p})
	return int(n), err
}

// barrier waits until the writer is past every item queued for s.
func (s *Stream) barrier() {
	ch := getNotify()
	s.c.queueOrdered(writeItem{kind: wBarrier, s: s, notify: ch})
	s.waitWritten(ch)
}

// waitWritten waits for the writer to finish the item that carries ch: true if the writer wrote
// it, false if it dropped it or exited first. A writer that wrote the item and then exited (the
// peer closed the connection right after reading it) readies both cases at once, so the item's own
// answer is looked for before writerDone is believed.
func (s *Stream) waitWritten(ch chan bool) bool {
	select {
	case ok := <-ch:
		notifyPool.Put(ch) // empty again: the writer sends once per item
		return ok
	case <-s.c.writerDone:
		select {
		case ok := <-ch:
			notifyPool.Put(ch)
			return ok
		default:
			return false // the item was never taken: ch does not go back to the pool
		}
	}
}

// notifyPool holds the channels a writer of the stream waits on (writeItem.notify), one per
// Write in flight rather than one per stream: a stream that is not writing holds none.
var notifyPool = sync.Pool{New: func() any { return make(chan bool, 1) }}

func getNotify() chan bool { return notifyPool.Get().(chan bool) }

// CloseWrite sends END_STREAM: the peer reads EOF, and this side can still read.
func (s *Stream) CloseWrite() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.c.srv && !s.accepted.Load() {
		return errors.New("hbone: CloseWrite before Accept")
	}
	c := s.c
	c.mu.Lock()
	if s.sentEnd && s.werr == nil {
		c.mu.Unlock()
		return nil
	}
	if err := s.writeErrLocked(); err != nil {
		c.mu.Unlock()
		return err
	}
	s.sentEnd = true
	c.mu.Unlock()
	c.queueOrdered(writeItem{kind: wData, s: s, end: true})
	c.maybeRemove(s)
	return nil
}

// Read reads the peer's bytes; io.EOF after the peer's END_STREAM (or RST_STREAM NO_ERROR).
func (s *Stream) Read(p []byte) (int, error) {
	for {
		s.mu.Lock()
		if len(s.chunks) > 0 {
			n := 0
			for n < len(p) && len(s.chunks) > 0 {
				ch := s.chunks[0]
				k := copy(p[n:], ch.buf[ch.r:ch.w])
				ch.r += k
				n += k
				if ch.r == ch.w {
					s.chunks[0] = nil
					s.chunks = s.chunks[1:]
					putChunk(ch)
				}
			}
			more := len(s.chunks) > 0
			s.mu.Unlock()
			if more {
				s.pokeRead()
			}
			s.c.credit(s, n)
			return n, nil
		}
		if err := s.readErrLocked(); err != nil {
			s.mu.Unlock()
			return 0, err
		}
		if len(p) == 0 {
			s.mu.Unlock()
			return 0, nil
		}
		readable := s.readableLocked()
		s.mu.Unlock()
		select {
		case <-readable:
		case <-s.rdl.wait():
			return 0, errDeadline
		}
	}
}

func (s *Stream) readErrLocked() error {
	if s.closed {
		return ErrStreamClosed
	}
	return s.rerr
}

// WriteTo copies the peer's bytes to w straight from the receive buffer, with no copy buffer;
// io.Copy uses it. Whatever is buffered leaves in one call: writev for a socket, one queueing for
// another Stream. It returns nil at the peer's END_STREAM.
func (s *Stream) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		n, err, idle := s.drainTo(w)
		total += n
		if !idle {
			return total, err
		}
		s.mu.Lock()
		readable, ready := s.readableLocked(), len(s.chunks) > 0 || s.readErrLocked() != nil
		s.mu.Unlock()
		if ready {
			continue // arrived after drainTo looked and before the channel existed
		}
		select {
		case <-readable:
		case <-s.rdl.wait():
			return total, errDeadline
		}
	}
}

// drainTo is WriteTo without the wait: it writes what is buffered and returns. idle reports that
// the stream is still open with nothing buffered; otherwise it ended (err nil at END_STREAM).
func (s *Stream) drainTo(w io.Writer) (total int64, err error, idle bool) {
	var batch []*chunk
	for {
		s.mu.Lock()
		if len(s.chunks) == 0 {
			err := s.readErrLocked()
			s.mu.Unlock()
			if err == io.EOF {
				return total, nil, false
			}
			return total, err, err == nil
		}
		n := min(len(s.chunks), maxBatchChunks)
		batch = append(batch[:0], s.chunks[:n]...)
		clear(s.chunks[:n])
		s.chunks = s.chunks[n:]
		s.mu.Unlock()
		bufs := make(net.Buffers, len(batch))
		size := 0
		for i, ch := range batch {
			bufs[i] = ch.buf[ch.r:ch.w]
			size += ch.w - ch.r
		}
		n64, err := writeBuffers(w, bufs)
		total += n64
		s.c.credit(s, size)
		for _, ch := range batch {
			putChunk(ch)
		}
		if err != nil {
			return total, err, false
		}
	}
}

// pending reports whether drainTo has something to do.
func (s *Stream) pending() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.chunks) > 0 || s.readErrLocked() != nil
}

// maxBatchChunks bounds one WriteTo batch (16 x 32 KiB).
const maxBatchChunks = 16

// buffersWriter writes several buffers in one go.
type buffersWriter interface {
	WriteBuffers(bufs net.Buffers) (int64, error)
}

func writeBuffers(w io.Writer, bufs net.Buffers) (int64, error) {
	if bw, ok := w.(buffersWriter); ok {
		return bw.WriteBuffers(bufs)
	}
	return writev(w, bufs)
}

// writev is net.Buffers.WriteTo (writev on a socket), apart so that only this path moves bufs to
// the heap (WriteTo's pointer receiver), not every writeBuffers call.
//
//go:noinline
func writev(w io.Writer, bufs net.Buffers) (int64, error) {
	return bufs.WriteTo(w)
}

// WriteBuffers sends bufs as DATA frames with a single wait for the writer, where Write would
// wait once per buffer. Consecutive buffers share a frame as far as the windows and the peer's
// frame size allow, so a splice's batch of receive chunks costs one frame header (and one short
// TLS record) instead of one per chunk.
func (s *Stream) WriteBuffers(bufs net.Buffers) (int64, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.c.srv && !s.accepted.Load() {
		return 0, errors.New("hbone: Write before Accept")
	}
	var size int64
	for _, p := range bufs {
		size += int64(len(p))
	}
	var total int64
	var cur bufCursor
	var done chan bool // the last item's: the writer took all of bufs
	for total < size {
		k, err := s.c.sendWindow(context.Background(), s, int(min(size-total, 1<<31-1)))
		if err != nil {
			if total > 0 {
				s.barrier()
			}
			return total, err
		}
		total += int64(k)
		it := writeItem{kind: wData, s: s}
		if total == size {
			done = getNotify()
			it.notify = done
		}
		cur.take(&it, bufs, k)
		s.c.queueOrdered(it)
	}
	if total > 0 && !s.waitWritten(done) {
		return total, fmt.Errorf("%w: %w", ErrConnClosed, s.c.closeErr())
	}
	return total, nil
}

// bufCursor is a position in a net.Buffers, which it never modifies.
type bufCursor struct{ i, off int }

// take puts the next k bytes of bufs into it's payload.
func (c *bufCursor) take(it *writeItem, bufs net.Buffers, k int) {
	for k > 0 {
		rest := bufs[c.i][c.off:]
		if len(rest) == 0 {
			c.i, c.off = c.i+1, 0
			continue
		}
		p := rest[:min(k, len(rest))]
		c.off += len(p)
		k -= len(p)
		if it.data == nil {
			it.data = p
		} else {
			it.more = append(it.more, p)
		}
	}
}

// ReadFrom copies r into the stream until r's EOF; it does not send END_STREAM.
func (s *Stream) ReadFrom(r io.Reader) (int64, error) {
	return copyPooled(s, r)
}

// push appends received DATA to the buffer; end marks the peer's END_STREAM.
func (s *Stream) push(p []byte, end bool) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		if len(p) > 0 {
			s.c.credit(s, len(p))
		}
		return
	}
	for len(p) > 0 {
		var ch *chunk
		if n := len(s.chunks); n > 0 && s.chunks[n-1].w < len(s.chunks[n-1].buf) {
			ch = s.chunks[n-1]
		} else {
			ch = getChunk()
			s.chunks = append(s.chunks, ch)
		}
		k := copy(ch.buf[ch.w:], p)
		ch.w += k
		p = p[k:]
	}
	if end && s.rerr == nil {
		s.rerr = io.EOF
	}
	s.mu.Unlock()
	s.c.pokeSoon(s)
}

// pushChunk appends a filled chunk to the buffer.
func (s *Stream) pushChunk(ch *chunk) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.c.credit(s, ch.w)
		putChunk(ch)
		return
	}
	s.chunks = append(s.chunks, ch)
	s.mu.Unlock()
	s.c.pokeSoon(s)
}

// fail ends the stream with err: reads see it after the buffered bytes (io.EOF for a reset with
// NO_ERROR or after the peer's END_STREAM), writes see it at once.
func (s *Stream) fail(err error) {
	var re *ResetError
	readErr := err
	if errors.As(err, &re) && re.Remote && re.Code == http2.ErrCodeNo {
		readErr = io.EOF
	}
	s.mu.Lock()
	if s.rerr == nil {
		s.rerr = readErr
	}
	s.mu.Unlock()
	s.c.mu.Lock()
	if s.werr == nil {
		s.werr = err
	}
	s.pokeWindowLocked()
	s.c.mu.Unlock()
	s.pokeRead()
	s.finish()
}

// finish runs once, when the stream is gone from its connection: it ends the Context.
func (s *Stream) finish() {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	s.ended = true
	done, afters := s.done, s.afters
	s.afters = nil
	s.mu.Unlock()
	if done != nil {
		close(done)
	}
	for a := afters; a != nil; a = a.next {
		go a.f()
	}
	if s.c.srv {
		return
	}
	s.c.mu.Lock()
	respCh, responded := s.respCh, s.responded
	s.responded = true
	s.c.mu.Unlock()
	if respCh != nil && !responded {
		close(respCh)
	}
}

// Reset aborts the stream with RST_STREAM(code); both directions fail.
func (s *Stream) Reset(code http2.ErrCode) {
	s.c.resetStream(s.id, code, false)
}

// Close ends the stream like closing a socket: a graceful END_STREAM when the peer already
// finished sending, RST_STREAM otherwise (NO_ERROR if we had sent END_STREAM, CANCEL if not).
// A server stream closed before Accept is answered 502. Close is idempotent.
func (s *Stream) Close() error {
	s.closeMu.Do(s.close)
	return nil
}

func (s *Stream) close() {
	c := s.c
	if c.srv && !s.accepted.Load() {
		s.respond(http.StatusBadGateway)
	}
	s.mu.Lock()
	s.closed = true
	unread := 0
	for _, ch := range s.chunks {
		unread += ch.w - ch.r
		putChunk(ch)
	}
	s.chunks = nil
	s.mu.Unlock()
	s.pokeRead()
	if unread > 0 {
		// The peer spent connection window on these bytes: give back what is still held, or
		// enough dropped streams would stall the whole connection.
		c.mu.Lock()
		c.releaseLocked(s, int64(unread))
		c.mu.Unlock()
	}

	c.mu.Lock()
	open := c.streams[s.id] == s
	sentEnd, recvEnded := s.sentEnd, s.recvEnded
	if open && recvEnded && !sentEnd {
		s.sentEnd = true
	}
	c.mu.Unlock()
	switch {
	case !open:
	case !recvEnded && sentEnd:
		c.resetStream(s.id, http2.ErrCodeNo, false)
	case !recvEnded:
		c.resetStream(s.id, http2.ErrCodeCancel, false)
	case !sentEnd:
		c.queueOrdered(writeItem{kind: wData, s: s, end: true})
		c.maybeRemove(s)
	}
	s.finish()
	if s.onClose != nil {
		s.onClose()
	}
}

// chunk is a piece of the receive buffer; buffers come from a pool and go back once read.
type chunk struct {
	buf  []byte
	r, w int
}

const chunkSize = 32 << 10

var chunkPool = sync.Pool{New: func() any { return &chunk{buf: make([]byte, chunkSize)} }}

func getChunk() *chunk { return chunkPool.Get().(*chunk) }

func putChunk(ch *chunk) {
	ch.r, ch.w = 0, 0
	chunkPool.Put(ch)
}

// deadline is a settable deadline whose channel closes when it passes (as in net.Pipe).
type deadline struct {
	mu    sync.Mutex
	timer *time.Timer
	ch    chan struct{} // nil: no deadline set yet
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.ch // the timer fired: wait for it to close ch
	}
	d.timer = nil
	closed := d.ch != nil && isClosed(d.ch)
	if t.IsZero() {
		if closed {
			d.ch = nil
		}
		return
	}
	if d.ch == nil || closed {
		d.ch = make(chan struct{})
	}
	if dur := time.Until(t); dur > 0 {
		ch := d.ch
		d.timer = time.AfterFunc(dur, func() { close(ch) })
		return
	}
	close(d.ch)
}

// wait returns a channel closed when the deadline passes. It makes one if no deadline was set,
// so that a Read or Write already blocked sees a deadline set later, as net.Conn promises.
func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
