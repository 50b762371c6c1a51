package sniff

import (
	"io"
	"net"
	"testing"
	"time"
)

// memConn is a net.Conn that reads from a byte slice (its deadlines are no-ops): the sniff's own
// cost without a transport's.
type memConn struct {
	net.Conn
	b []byte
}

func (c *memConn) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.b)
	c.b = c.b[n:]
	return n, nil
}

func (c *memConn) SetReadDeadline(time.Time) error { return nil }

// BenchmarkSniff: one stream's sniff (peek, classify, replay setup) for each protocol's first
// flight, in memory.
func BenchmarkSniff(b *testing.B) {
	for _, tc := range []struct {
		name  string
		first []byte
	}{
		{"http1", []byte("GET /x HTTP/1.1\r\nHost: a\r\n\r\n")},
		{"h2", []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04")},
		{"tls", clientHello(b, "echo.example.com")},
		{"tcp", []byte{0, 1, 2, 3}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := Sniff(&memConn{b: tc.first}, time.Second); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
