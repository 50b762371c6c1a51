//go:build !unix

package hbone

import (
	"io"
	"sync"
)

// pooledReader reads from r into buffers from pool. Without raw descriptor reads (Windows,
// plan9, wasm) the buffer is held across the read; an idle connection holds one.
type pooledReader struct {
	r    io.Reader
	pool *sync.Pool
}

func newPooledReader(r io.Reader, pool *sync.Pool) *pooledReader {
	return &pooledReader{r: r, pool: pool}
}

// read reads once into a buffer from the pool.
func (pr *pooledReader) read() (*[]byte, int, error) {
	bp := pr.pool.Get().(*[]byte)
	n, err := pr.r.Read(*bp)
	return bp, n, err
}
