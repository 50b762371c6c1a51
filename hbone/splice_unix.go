//go:build unix

package hbone

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// pooledReader reads from r into buffers from pool, one read at a time. For a socket it reads
// with the raw descriptor and holds a buffer only while a read succeeds: while the socket has no
// data the buffer goes back to the pool, so an idle connection holds none. The raw connection
// and the read callback are made once, not per read (they were five allocations a read).
type pooledReader struct {
	r    io.Reader
	pool *sync.Pool
	rc   syscall.RawConn // nil: r is not a socket
	fn   func(fd uintptr) bool

	// Set by fn during one read.
	bp  *[]byte
	n   int
	err error
}

func newPooledReader(r io.Reader, pool *sync.Pool) *pooledReader {
	pr := &pooledReader{r: r, pool: pool}
	if sc, ok := r.(syscall.Conn); ok {
		if _, isStream := r.(*Stream); !isStream {
			if rc, err := sc.SyscallConn(); err == nil {
				pr.rc = rc
				pr.fn = pr.readFD
			}
		}
	}
	return pr
}

// read reads once. It returns the buffer (nil if none is held) and io.EOF at end of stream.
func (pr *pooledReader) read() (*[]byte, int, error) {
	if pr.rc == nil {
		bp := pr.pool.Get().(*[]byte)
		n, err := pr.r.Read(*bp)
		return bp, n, err
	}
	pr.bp, pr.n, pr.err = nil, 0, nil
	err := pr.rc.Read(pr.fn)
	bp, n, rerr := pr.bp, pr.n, pr.err
	pr.bp = nil
	switch {
	case err != nil:
		return bp, 0, err
	case rerr == syscall.EINTR:
		return bp, 0, nil
	case rerr != nil:
		return bp, 0, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		return bp, 0, io.EOF
	}
	return bp, n, nil
}

func (pr *pooledReader) readFD(fd uintptr) bool {
	if pr.bp == nil {
		pr.bp = pr.pool.Get().(*[]byte)
	}
	pr.n, pr.err = syscall.Read(int(fd), *pr.bp)
	if pr.err == syscall.EAGAIN {
		pr.pool.Put(pr.bp)
		pr.bp = nil
		return false
	}
	return true
}
