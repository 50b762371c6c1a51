//go:build unix

package hbone

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// readPooled reads once from r into a buffer from pool. For a socket it reads with the raw
// descriptor and holds the buffer only while the read succeeds: while the socket has no data the
// buffer goes back to the pool, so an idle connection holds none. It returns the buffer (nil if
// none is held) and io.EOF at end of stream.
func readPooled(r io.Reader, pool *sync.Pool) (*[]byte, int, error) {
	sc, ok := r.(syscall.Conn)
	if _, isStream := r.(*Stream); !ok || isStream {
		bp := pool.Get().(*[]byte)
		n, err := r.Read(*bp)
		return bp, n, err
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		bp := pool.Get().(*[]byte)
		n, err := r.Read(*bp)
		return bp, n, err
	}
	var bp *[]byte
	var n int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		if bp == nil {
			bp = pool.Get().(*[]byte)
		}
		n, rerr = syscall.Read(int(fd), *bp)
		if rerr == syscall.EAGAIN {
			pool.Put(bp)
			bp = nil
			return false
		}
		return true
	})
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
