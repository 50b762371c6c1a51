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
	left       int     // owned by the reader: bytes of a record crypto/tls has the start of, still to come
	hdr        [5]byte // owned by the reader: the start of a record header split between two reads
	hdrN       int     // owned by the reader: bytes in hdr

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
	copy(p, (*w.rbuf)[w.r:w.r+k])
	w.r += k
	if w.r == w.n {
		wirePool.Put(w.rbuf)
		w.rbuf = nil
	}
	return k, nil
}

// take is how much of b, the pending input, to hand crypto/tls for a read of limit bytes: the rest
// of a record it has the start of and the whole TLS records after it that fit; or, when b starts
// with a record that is not all here, that piece alone. crypto/tls keeps its input in a
// bytes.Buffer and reads more only once it used up every whole record in it, so a piece handed
// alone lands at the start of its emptied buffer, where the rest of the record has room; handed
// after whole records it would sit at the end, and crypto/tls would slide it to the front (a
// memmove of up to a record) before reading the rest. take follows the record boundaries from
// the connection's first byte (w.left, and w.hdr for a header split between two reads).
func (w *wireConn) take(b []byte, limit int) int {
	if w.hdrN > 0 {
		k := copy(w.hdr[w.hdrN:], b[:min(len(b), limit)])
		w.hdrN += k
		if w.hdrN == recordHeaderLen {
			w.left, w.hdrN = recordLen(w.hdr[:]), 0
		}
		return k
	}
	tail := min(w.left, len(b), limit)
	off := tail
	w.left -= tail
	if w.left == 0 {
		for off+recordHeaderLen <= len(b) {
			next := off + recordHeaderLen + recordLen(b[off:])
			if next > len(b) || next > limit {
				break
			}
			off = next
		}
	}
	if off > 0 {
		return off
	}
	// The start of a record, alone: all of it that is here, or all that fits.
	k := min(len(b), limit)
	if k < recordHeaderLen {
		w.hdrN = copy(w.hdr[:], b[:k])
	} else {
		w.left = recordHeaderLen + recordLen(b) - k
	}
	return k
}

func recordLen(hdr []byte) int { return int(hdr[3])<<8 | int(hdr[4]) }

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
