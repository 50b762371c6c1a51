//go:build !unix

package hbone

import (
	"io"
	"sync"
)

// readPooled reads once from r into a buffer from pool. Without raw descriptor reads (Windows,
// plan9, wasm) the buffer is held across the read; an idle connection holds one.
func readPooled(r io.Reader, pool *sync.Pool) (*[]byte, int, error) {
	bp := pool.Get().(*[]byte)
	n, err := r.Read(*bp)
	return bp, n, err
}
