package hbone

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"testing"
)

// scriptConn is a net.Conn whose reads return data in the sizes of a script, then io.EOF.
type scriptConn struct {
	net.Conn
	data  []byte
	sizes []int
}

func (c *scriptConn) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := len(c.data)
	if len(c.sizes) > 0 {
		n, c.sizes = min(n, c.sizes[0]), c.sizes[1:]
	}
	n = copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

const (
	maxCiphertext             = 1<<14 + 256 // TLS 1.3 ciphertext per record (RFC 8446 section 5.2)
	recordTypeApplicationData = 23
)

// records makes a stream of n TLS application-data records of random sizes (a handshake
// record first) and returns it with the offsets where records end.
func records(r *rand.Rand, n int) ([]byte, map[int]bool) {
	var b []byte
	ends := map[int]bool{}
	add := func(typ byte, size int) {
		b = append(b, typ, 3, 3, byte(size>>8), byte(size))
		for range size {
			b = append(b, byte(r.Uint32()))
		}
		ends[len(b)] = true
	}
	add(22, 300)
	for range n {
		size := maxCiphertext
		if r.IntN(3) == 0 {
			size = 1 + r.IntN(maxCiphertext)
		}
		add(recordTypeApplicationData, size)
	}
	return b, ends
}

// TestWireConnServesWholeRecords: whatever sizes the socket's reads return, the bytes come out
// unchanged, and no read hands crypto/tls a record boundary followed by a partial record (which
// it would have to slide to the front of its buffer before reading the rest).
func TestWireConnServesWholeRecords(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for trial := range 50 {
		in, ends := records(r, 40)
		var sizes []int
		for range 400 {
			if r.IntN(4) == 0 {
				sizes = append(sizes, 1+r.IntN(7)) // splits record headers
			} else {
				sizes = append(sizes, 1+r.IntN(3*wireBufSize/2))
			}
		}
		w := newWireConn(&scriptConn{data: in, sizes: sizes})
		var out []byte
		for {
			p := make([]byte, 517+r.IntN(3*maxCiphertext))
			n, err := w.Read(p)
			start := len(out)
			out = append(out, p[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("trial %d: %v", trial, err)
			}
			if n == 0 {
				t.Fatalf("trial %d: empty read", trial)
			}
			if ends[len(out)] {
				continue
			}
			for i := start + 1; i < len(out); i++ {
				if ends[i] {
					t.Fatalf("trial %d: a read of bytes %d-%d holds the record end at %d and a partial record after it", trial, start, len(out), i)
				}
			}
		}
		if !bytes.Equal(out, in) {
			t.Fatalf("trial %d: %d bytes out, %d in, or different", trial, len(out), len(in))
		}
	}
}

// TestWireConnPassesOtherBytes: bytes that are not TLS records (a plain-text client) reach
// crypto/tls at once, so it answers them as it would without the buffer.
func TestWireConnPassesOtherBytes(t *testing.T) {
	in := []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	w := newWireConn(&scriptConn{data: in})
	p := make([]byte, 1024)
	n, err := w.Read(p)
	if err != nil || !bytes.Equal(p[:n], in) {
		t.Fatalf("Read = %q, %v; want %q", p[:n], err, in)
	}
}
