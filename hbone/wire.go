package hbone

import (
	"io"
	"net"
	"sync"
)

// Buffer sizes on the wire. ztunnel reads and writes TLS in 256 KiB batches
// (istio/ztunnel benches/README.md; PR #1169); Go's crypto/tls issues one syscall per 16 KiB
// record, so batching below TLS is where a Go HBONE beats plain Go TLS.
const (
	wireBufSize  = 256 << 10 // records batched under TLS, per read and per write syscall
	frameBufSize = 64 << 10  // frames batched above TLS into one tls.Conn.Write

	maxRecordPayload = 16 << 10 // TLS 1.3 plaintext per record (RFC 8446 section 5.1)
)

var (
	wirePool  = sync.Pool{New: func() any { b := make([]byte, wireBufSize); return &b }}
	framePool = sync.Pool{New: func() any { b := make([]byte, frameBufSize); return &b }}
)

// wireConn sits under crypto/tls. Reads fill a pooled buffer with one syscall and serve TLS
// records from it; writes made while the HTTP/2 writer holds a batch are gathered and leave in
// one syscall at release. Buffers are pooled and held only while data is pending, so an idle
// connection holds none.
type wireConn struct {
	net.Conn

	pr         *pooledReader // owned by the reader, made at the first read
	beforeWait func()        // set before the first frame is read: called before each socket read
	rbuf       *[]byte       // owned by the reader: pending input, nil when drained
	r, n       int
	left       int  // owned by the reader: bytes of a record crypto/tls has the start of, still to come
	lost       bool // owned by the reader: record boundaries are no longer known (see take)

	mu   sync.Mutex // guards wbuf and hold: TLS alerts may be written from other goroutines
	wbuf *[]byte
	wlen int
	hold bool
}

func newWireConn(nc net.Conn) *wireConn { return &wireConn{Conn: nc} }

func (w *wireConn) Read(p []byte) (int, error) {
	if w.rbuf == nil {
		if w.beforeWait != nil {
			w.beforeWait()
		}
		if w.pr == nil {
			w.pr = newPooledReader(w.Conn, &wirePool)
		}
		bp, n, err := w.pr.read()
		if n == 0 {
			if bp != nil {
				wirePool.Put(bp)
			}
			return 0, err
		}
		w.rbuf = bp
		w.r, w.n = 0, n
	}
	k := w.take((*w.rbuf)[w.r:w.n], len(p))
	for k == 0 {
		// Only the start of a record is here: read the rest in behind it, rather than hand
		// crypto/tls a piece it would have to slide down later. In the buffer's last quarter
		// the piece (at most a record) moves to the front first, so the read has room for a
		// batch, not only for the rest of the record.
		if len(*w.rbuf)-w.n < wireBufSize/4 {
			w.n = copy(*w.rbuf, (*w.rbuf)[w.r:w.n])
			w.r = 0
		}
		if w.beforeWait != nil {
			w.beforeWait()
		}
		n, err := w.Conn.Read((*w.rbuf)[w.n:])
		w.n += n
		if err != nil {
			break // serve what is here; the error comes back on the next read
		}
		k = w.take((*w.rbuf)[w.r:w.n], len(p))
	}
	if k == 0 {
		k = w.takeAny((*w.rbuf)[w.r:w.n], len(p))
	}
	copy(p, (*w.rbuf)[w.r:w.r+k])
	w.r += k
	if w.r == w.n {
		wirePool.Put(w.rbuf)
		w.rbuf = nil
	}
	return k, nil
}

// take is how much of b, the pending input, to hand crypto/tls for a read of limit bytes: the rest
// of a record it has the start of and the whole TLS records after it that fit, or 0 when b holds
// only the start of a record (read more first). crypto/tls keeps unread input in a bytes.Buffer
// that it slides down (a memmove) whenever a partial record is left in it; served whole records,
// the buffer runs empty and is reset instead. take follows the record boundaries from the first
// byte of the connection (w.left); a record header split by a read of under 5 bytes would lose them,
// and then it serves bytes as they come (w.lost).
func (w *wireConn) take(b []byte, limit int) int {
	if w.lost {
		return min(len(b), limit)
	}
	tail := min(w.left, len(b), limit)
	off := tail
	if tail == w.left {
		for off+recordHeaderLen <= len(b) {
			next := off + recordHeaderLen + recordLen(b[off:])
			if next > len(b) || next > limit {
				break
			}
			off = next
		}
	}
	w.left -= tail
	if off > 0 || partialRecord(b) {
		return off
	}
	// A whole record larger than limit, a record crypto/tls will refuse, or a handshake
	// record: it gets what there is at once, as it would without this buffer.
	return w.takeAny(b, limit)
}

// partialRecord reports whether b, which starts at a record boundary, holds only part of a
// record header or of an application-data record of a size TLS allows: crypto/tls can do
// nothing before the rest is here.
func partialRecord(b []byte) bool {
	if len(b) < recordHeaderLen {
		return true
	}
	n := recordLen(b)
	return b[0] == recordTypeApplicationData && n <= maxCiphertext && len(b) < recordHeaderLen+n
}

// takeAny hands crypto/tls the start of a record, whole or not, and remembers how much of it is
// still to come.
func (w *wireConn) takeAny(b []byte, limit int) int {
	k := min(len(b), limit)
	switch {
	case w.lost || w.left > 0:
		w.left -= min(w.left, k)
	case k < recordHeaderLen:
		w.lost = true
	default:
		w.left = max(0, recordHeaderLen+recordLen(b)-k)
	}
	return k
}

func recordLen(hdr []byte) int { return int(hdr[3])<<8 | int(hdr[4]) }

const (
	recordTypeApplicationData = 23          // RFC 8446 section 5.1
	maxCiphertext             = 1<<14 + 256 // TLS 1.3 ciphertext per record (RFC 8446 section 5.2)
)

// recordHeaderLen is a TLS record's header: type, version, length (RFC 8446 section 5.1).
const recordHeaderLen = 5

func (w *wireConn) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.hold {
		return w.Conn.Write(p)
	}
	total := len(p)
	for len(p) > 0 {
		if w.wbuf == nil {
			w.wbuf = wirePool.Get().(*[]byte)
		}
		k := copy((*w.wbuf)[w.wlen:], p)
		w.wlen += k
		p = p[k:]
		if w.wlen == wireBufSize {
			if err := w.flushLocked(); err != nil {
				return total - len(p), err
			}
		}
	}
	return total, nil
}

// batch starts gathering writes.
func (w *wireConn) batch() {
	w.mu.Lock()
	w.hold = true
	w.mu.Unlock()
}

// release writes what was gathered and stops gathering.
func (w *wireConn) release() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.hold = false
	err := w.flushLocked()
	if w.wbuf != nil {
		wirePool.Put(w.wbuf)
		w.wbuf = nil
	}
	return err
}

func (w *wireConn) flushLocked() error {
	if w.wlen == 0 {
		return nil
	}
	_, err := w.Conn.Write((*w.wbuf)[:w.wlen])
	w.wlen = 0
	return err
}

// CloseWrite passes a half-close through when the connection has one.
func (w *wireConn) CloseWrite() error {
	if cw, ok := w.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// frameWriter gathers frames above TLS, so small frames share records and a flush is one
// tls.Conn.Write. Its buffer is pooled and returned at every flush. Owned by the HTTP/2 writer.
type frameWriter struct {
	w   io.Writer
	buf *[]byte
	n   int
}

func (f *frameWriter) Write(p []byte) (int, error) {
	if len(p) >= maxRecordPayload {
		// A payload of a full TLS record or more goes to TLS as is (after what is buffered,
		// as one short record): copying it through the buffer would cost a memmove of every
		// byte of a bulk stream, while a short record costs one AEAD call on a few bytes.
		// (The waypoint forwards 32 KiB receive chunks: each is two whole records this way.)
		if f.n > 0 {
			if err := f.write(); err != nil {
				return 0, err
			}
		}
		return f.w.Write(p)
	}
	total := len(p)
	for len(p) > 0 {
		if f.buf == nil {
			f.buf = framePool.Get().(*[]byte)
		}
		k := copy((*f.buf)[f.n:], p)
		f.n += k
		p = p[k:]
		if f.n == frameBufSize {
			if err := f.write(); err != nil {
				return total - len(p), err
			}
		}
	}
	return total, nil
}

func (f *frameWriter) buffered() int { return f.n }

func (f *frameWriter) write() error {
	_, err := f.w.Write((*f.buf)[:f.n])
	f.n = 0
	return err
}

// flush writes what is buffered and returns the buffer to the pool.
func (f *frameWriter) flush() error {
	if f.buf == nil {
		return nil
	}
	var err error
	if f.n > 0 {
		err = f.write()
	}
	framePool.Put(f.buf)
	f.buf = nil
	return err
}
