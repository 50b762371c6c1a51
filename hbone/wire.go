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

	rbuf *[]byte // owned by the reader: pending input, nil when drained
	r, n int

	mu   sync.Mutex // guards wbuf and hold: TLS alerts may be written from other goroutines
	wbuf *[]byte
	wlen int
	hold bool
}

func newWireConn(nc net.Conn) *wireConn { return &wireConn{Conn: nc} }

func (w *wireConn) Read(p []byte) (int, error) {
	if w.rbuf == nil {
		if len(p) >= wireBufSize {
			return w.Conn.Read(p)
		}
		bp, n, err := readPooled(w.Conn, &wirePool)
		if n == 0 {
			if bp != nil {
				wirePool.Put(bp)
			}
			return 0, err
		}
		w.rbuf = bp
		w.r, w.n = 0, n
	}
	k := copy(p, (*w.rbuf)[w.r:w.n])
	w.r += k
	if w.r == w.n {
		wirePool.Put(w.rbuf)
		w.rbuf = nil
	}
	return k, nil
}

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
	if len(p) >= frameBufSize {
		// A large payload goes to TLS as is (after what is buffered): copying it through
		// the buffer first would cost a memmove of every byte of a bulk stream.
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
