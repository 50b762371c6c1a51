// Package sniff tells what protocol a stream speaks by peeking at its first bytes (as few as
// decide it), then hands back a connection that replays them: HTTP/1.x, HTTP/2 with prior
// knowledge (gRPC), TLS (with the SNI from the ClientHello), or opaque TCP. A client that sends
// nothing first (server-speaks-first protocols) is opaque TCP after a short wait.
package sniff

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"time"
)

// Protocol is what a stream speaks.
type Protocol int

const (
	TCP   Protocol = iota // opaque bytes
	HTTP1                 // HTTP/1.0 or 1.1
	HTTP2                 // HTTP/2 prior knowledge (h2c, gRPC)
	TLS                   // a TLS ClientHello
)

func (p Protocol) String() string {
	return [...]string{"tcp", "http/1.1", "http2", "tls"}[p]
}

// Defaults.
const (
	// DefaultWait is how long to wait for the client's first bytes before calling the stream
	// opaque TCP (a server-speaks-first protocol sends nothing).
	DefaultWait = 200 * time.Millisecond
	// MaxPeek bounds the bytes held to decide (a ClientHello with post-quantum key shares is
	// about 1.5 KiB; 16 KiB is one full TLS record).
	MaxPeek = 16 << 10
)

// Result is what Sniff found.
type Result struct {
	Protocol Protocol
	SNI      string // TLS only, when the ClientHello names a server
}

// Conn replays the peeked bytes, then reads from the stream.
type Conn struct {
	net.Conn
	buf []byte
}

// Read serves the peeked bytes first.
func (c *Conn) Read(p []byte) (int, error) {
	if len(c.buf) > 0 {
		n := copy(p, c.buf)
		c.buf = c.buf[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// WriteTo replays the peeked bytes, then lets the stream copy itself (keeping its fast path).
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	var total int64
	if len(c.buf) > 0 {
		n, err := w.Write(c.buf)
		total += int64(n)
		c.buf = c.buf[n:]
		if err != nil {
			return total, err
		}
	}
	n, err := io.Copy(w, c.Conn)
	return total + n, err
}

// CloseWrite passes a half-close through.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// Sniff peeks at c's first bytes, at most MaxPeek of them and for at most wait (0 means
// DefaultWait) before the first byte, and says what c speaks. The returned Conn must be used in
// place of c. A read error other than the wait running out is returned.
func Sniff(c net.Conn, wait time.Duration) (*Conn, Result, error) {
	if wait <= 0 {
		wait = DefaultWait
	}
	sc := &Conn{Conn: c}
	buf := make([]byte, 0, 512)
	deadline := time.Now().Add(wait)
	for {
		res, done := classify(buf)
		if done || len(buf) >= MaxPeek {
			sc.buf = buf
			return sc, res, nil
		}
		if len(buf) == cap(buf) {
			buf = append(buf, make([]byte, min(cap(buf), MaxPeek-len(buf)))...)[:len(buf)]
		}
		if len(buf) == 0 {
			c.SetReadDeadline(deadline)
		} else {
			// Once the client spoke, the rest of its first message follows: allow a longer bound.
			c.SetReadDeadline(time.Now().Add(5 * wait))
		}
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		c.SetReadDeadline(time.Time{})
		if err != nil {
			sc.buf = buf
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, io.EOF) {
				// Undecided when the client paused or ended: a TLS record cut short is still
				// TLS; anything else is opaque.
				if res, _ := classify(buf); res.Protocol == TLS {
					return sc, res, nil
				}
				return sc, Result{Protocol: TCP}, nil
			}
			return sc, Result{}, err
		}
	}
}

var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

var methods = [][]byte{
	[]byte("GET "), []byte("POST "), []byte("PUT "), []byte("DELETE "), []byte("HEAD "),
	[]byte("OPTIONS "), []byte("PATCH "), []byte("CONNECT "), []byte("TRACE "),
}

// classify decides from the bytes so far; done is false while more bytes could change the answer.
func classify(b []byte) (Result, bool) {
	if len(b) == 0 {
		return Result{}, false
	}
	switch {
	case b[0] == 0x16: // TLS handshake record
		sni, complete, ok := clientHelloSNI(b)
		if !ok {
			return Result{Protocol: TCP}, true
		}
		return Result{Protocol: TLS, SNI: sni}, complete
	case b[0] == 'P' && bytes.HasPrefix(h2Preface, b[:min(len(b), len(h2Preface))]):
		if len(b) >= len(h2Preface) {
			return Result{Protocol: HTTP2}, true
		}
		return Result{}, false
	}
	for _, m := range methods {
		n := min(len(b), len(m))
		if bytes.Equal(b[:n], m[:n]) {
			if len(b) >= len(m) {
				return Result{Protocol: HTTP1}, true
			}
			return Result{}, false // a prefix of a method so far
		}
	}
	return Result{Protocol: TCP}, true
}
