//go:build windows

package hbone_test

import "syscall"

// setRcvBuf shrinks a socket's receive buffer (best effort: a test's bound, not its claim).
func setRcvBuf(fd uintptr, n int) {
	_ = syscall.SetsockoptInt(syscall.Handle(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, n)
}
