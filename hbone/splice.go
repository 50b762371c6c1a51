package hbone

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// copyBufSize is the pooled copy buffer: large enough that a bulk stream moves in few writes.
const copyBufSize = 128 << 10

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// Splice moves bytes both ways between a and b until both directions end, then closes both.
// A clean EOF on one side is passed on as CloseWrite (END_STREAM or a TCP FIN) and the other
// direction keeps flowing, for as long as it makes progress within halfCloseTimeout (0 means
// DefaultHalfCloseTimeout). An error or reset in either direction aborts both sides: a Stream is
// reset with CONNECT_ERROR and a TCP connection closed with RST. It returns the first error.
func Splice(a, b net.Conn, halfCloseTimeout time.Duration) error {
	_, err := SpliceCount(a, b, halfCloseTimeout)
	return err
}

// Counts are the bytes a Splice moved each way.
type Counts struct {
	AToB, BToA int64
}

// SpliceCount is Splice that also reports the bytes moved each way (for metrics).
func SpliceCount(a, b net.Conn, halfCloseTimeout time.Duration) (Counts, error) {
	if sa, ok := a.(*Stream); ok {
		// a -> b runs only while a has bytes: an idle spliced stream parks one goroutine, not two.
		sp := &halfAsync{done: make(chan struct{})}
		sp.init(a, b, halfCloseTimeout)
		sp.ab.start(sa, b, &sp.aToB, sp)
		sp.end(pipe(a, b, &sp.bToA))
		<-sp.done
		return sp.result()
	}
	sp := newSplice(a, b, halfCloseTimeout)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sp.end(pipe(b, a, &sp.aToB))
	}()
	sp.end(pipe(a, b, &sp.bToA))
	<-done
	return sp.result()
}

// halfAsync is a SpliceCount whose a -> b direction is a drainer.
type halfAsync struct {
	splice
	ab   drainer
	done chan struct{}
}

func (sp *halfAsync) drained(err error) {
	sp.end(err)
	close(sp.done)
}

// SpliceAsync is SpliceCount between two Streams that returns at once: both directions run
// only while bytes flow (an idle pair holds no goroutine), and done is called once, after both
// directions ended and both streams are closed, from the goroutine that ended the last one.
// done must not block for long (it runs on a stream's drain).
func SpliceAsync(a, b *Stream, halfCloseTimeout time.Duration, done func(Counts, error)) {
	sp := &asyncSplice{done: done} // the pair's one allocation: an idle pair holds only this
	sp.init(a, b, halfCloseTimeout)
	sp.left.Store(2)
	sp.ab.start(a, b, &sp.aToB, sp)
	sp.ba.start(b, a, &sp.bToA, sp)
}

// asyncSplice is one SpliceAsync: the shared state and both directions' drainers.
type asyncSplice struct {
	splice
	left   atomic.Int32 // directions still running
	ab, ba drainer
	done   func(Counts, error)
}

func (sp *asyncSplice) drained(err error) {
	sp.end(err)
	if sp.left.Add(-1) == 0 {
		sp.done(sp.result())
	}
}

// splice is one Splice's shared state: its counts, first error and half-close watchdog.
type splice struct {
	a, b                 net.Conn
	timeout              time.Duration
	aToB, bToA, finished atomic.Int64
	watchdog             atomic.Pointer[time.Timer]
	once                 sync.Once
	firstErr             error // set once, read by result after both directions ended
}

func newSplice(a, b net.Conn, halfCloseTimeout time.Duration) *splice {
	sp := &splice{}
	sp.init(a, b, halfCloseTimeout)
	return sp
}

func (sp *splice) init(a, b net.Conn, halfCloseTimeout time.Duration) {
	if halfCloseTimeout <= 0 {
		halfCloseTimeout = DefaultHalfCloseTimeout
	}
	sp.a, sp.b, sp.timeout = a, b, halfCloseTimeout
}

// end records one direction's end: an error aborts both sides; the first clean end starts the
// half-close watchdog.
func (sp *splice) end(err error) {
	if err != nil {
		sp.once.Do(func() { sp.firstErr = err })
		abort(sp.a, sp.b)
		return
	}
	if sp.finished.Add(1) == 1 {
		progress := func() int64 { return sp.aToB.Load() + sp.bToA.Load() }
		sp.watchdog.Store(watch(progress, sp.timeout, func() { abort(sp.a, sp.b) }))
	}
}

// result stops the watchdog and closes both sides, once both directions ended.
func (sp *splice) result() (Counts, error) {
	if t := sp.watchdog.Load(); t != nil {
		t.Stop()
	}
	return Counts{AToB: sp.aToB.Load(), BToA: sp.bToA.Load()}, errors.Join(sp.firstErr, closeBoth(sp.a, sp.b))
}

// drainer copies src to dst (then half-closes dst) in a goroutine started whenever src has
// bytes or ends (src's readable hook pokes it), and gone while src is idle; its owner's drained
// is called once, with the copy's error. It is a field of its splice, not an allocation of its
// own, and holds no buffer: drainTo writes src's receive chunks as they are.
type drainer struct {
	src     *Stream
	w       progressWriter // dst, counting into the splice's progress
	running atomic.Bool
	owner   interface{ drained(error) }
}

func (d *drainer) start(src *Stream, dst net.Conn, progress *atomic.Int64, owner interface{ drained(error) }) {
	d.src, d.w, d.owner = src, progressWriter{dst, progress}, owner
	src.onReadable.Store(d)
	d.poke()
}

// poke starts the drain unless one runs.
func (d *drainer) poke() {
	if d.running.CompareAndSwap(false, true) {
		go d.run()
	}
}

func (d *drainer) run() {
	for {
		_, err, idle := d.src.drainTo(&d.w)
		if !idle {
			d.src.onReadable.Store(nil)
			if err == nil {
				err = closeWrite(d.w.w.(net.Conn))
			}
			d.owner.drained(err)
			return
		}
		d.running.Store(false)
		// Bytes that arrived after the drain and before the flag dropped poked a running
		// drainer and were not seen: look again.
		if !d.src.pending() || !d.running.CompareAndSwap(false, true) {
			return
		}
	}
}

// watch calls stall when progress has not moved for d.
func watch(progress func() int64, d time.Duration, stall func()) *time.Timer {
	last := progress()
	var mu sync.Mutex
	var t *time.Timer
	mu.Lock() // the callback waits until t is assigned
	defer mu.Unlock()
	t = time.AfterFunc(d, func() {
		mu.Lock()
		defer mu.Unlock()
		if now := progress(); now != last {
			last = now
			t.Reset(d)
			return
		}
		stall()
	})
	return t
}

// pipe copies src to dst and half-closes dst at src's EOF.
func pipe(dst, src net.Conn, progress *atomic.Int64) error {
	var err error
	if s, ok := src.(*Stream); ok {
		_, err = s.WriteTo(progressWriter{dst, progress})
	} else {
		_, err = copyProgress(dst, src, progress)
	}
	if err != nil {
		return err
	}
	return closeWrite(dst)
}

type progressWriter struct {
	w io.Writer
	p *atomic.Int64
}

func (pw progressWriter) Write(b []byte) (int, error) {
	n, err := pw.w.Write(b)
	pw.p.Add(int64(n))
	return n, err
}

// WriteBuffers keeps the destination's batched write (writev, or one Stream queueing).
func (pw progressWriter) WriteBuffers(bufs net.Buffers) (int64, error) {
	n, err := writeBuffers(pw.w, bufs)
	pw.p.Add(n)
	return n, err
}

func copyPooled(dst io.Writer, src io.Reader) (int64, error) {
	return copyProgress(dst, src, nil)
}

// copyProgress copies with a pooled buffer taken only once src has data, so an idle stream holds
// no copy buffer.
func copyProgress(dst io.Writer, src io.Reader, progress *atomic.Int64) (int64, error) {
	var total int64
	pr := newPooledReader(src, &copyBufPool)
	for {
		bp, n, rerr := pr.read()
		var werr error
		if n > 0 {
			var w int
			w, werr = dst.Write((*bp)[:n])
			total += int64(w)
			if progress != nil {
				progress.Add(int64(w))
			}
		}
		if bp != nil {
			copyBufPool.Put(bp)
		}
		switch {
		case werr != nil:
			return total, werr
		case rerr == io.EOF:
			return total, nil
		case rerr != nil:
			return total, rerr
		}
	}
}

func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// abort ends both sides abruptly, so a reset on one side reaches the other.
func abort(cs ...net.Conn) {
	for _, c := range cs {
		switch c := c.(type) {
		case *Stream:
			c.Reset(http2.ErrCodeConnect)
		case *net.TCPConn:
			c.SetLinger(0)
			c.Close()
		default:
			c.Close()
		}
	}
}

func closeBoth(a, b net.Conn) error {
	return errors.Join(ignoreClosed(a.Close()), ignoreClosed(b.Close()))
}

func ignoreClosed(err error) error {
	if errors.Is(err, net.ErrClosed) || errors.Is(err, ErrStreamClosed) {
		return nil
	}
	return err
}
