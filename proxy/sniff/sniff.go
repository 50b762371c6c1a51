// Package sniff tells what protocol a stream speaks by peeking at its first bytes (as few as
// decide it), then hands back a connection that replays them: HTTP/1.x, HTTP/2 with prior
// knowledge (gRPC), TLS (with the SNI from the ClientHello), or opaque TCP. The wait for bytes
// that decide is bounded once for the whole sniff, as Envoy bounds its listener filters; when it
// runs out the caller learns so (ErrTimeout) and chooses: Istio's waypoint closes the connection.
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
	// DefaultWait bounds the whole sniff, from its start until the bytes decide: Envoy's
	// default listener_filters_timeout (15 s), which Istio's waypoint leaves in place on the
	// listener that detects the protocol (pilot listener_waypoint.go, main_internal). A client
	// that sends nothing (a server-speaks-first protocol) runs it out.
	DefaultWait = 15 * time.Second
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

// ErrTimeout: the wait ran out before the client's bytes decided its protocol.
var ErrTimeout = errors.New("sniff: the client's bytes did not decide its protocol in time")

// Sniff peeks at c's first bytes, at most MaxPeek of them and for at most wait in all (0 means
// DefaultWait), and says what c speaks. The returned Conn must be used in place of c; it replays
// every byte peeked. A client that ends (EOF) has decided with what it sent. When the wait runs
// out first, Sniff returns ErrTimeout with the Conn and its guess from the bytes so far (TLS for
// a ClientHello cut short, else TCP); the caller decides whether to carry the stream on. Any
// other read error is returned as is.
func Sniff(c net.Conn, wait time.Duration) (*Conn, Result, error) {
	if wait <= 0 {
		wait = DefaultWait
	}
	sc := &Conn{Conn: c}
	buf := make([]byte, 0, 512)
	// One deadline for the whole decision, as Envoy's listener filter timer: a client trickling
	// its first bytes holds the stream no longer than a silent one.
	c.SetReadDeadline(time.Now().Add(wait))
	defer c.SetReadDeadline(time.Time{})
	for {
		res, done := classify(buf)
		if done || len(buf) >= MaxPeek {
			sc.buf = buf
			return sc, res, nil
		}
		if len(buf) == cap(buf) {
			buf = append(buf, make([]byte, min(cap(buf), MaxPeek-len(buf)))...)[:len(buf)]
		}
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			sc.buf = buf
			timeout := errors.Is(err, os.ErrDeadlineExceeded)
			if !timeout && !errors.Is(err, io.EOF) {
				return sc, Result{}, err
			}
			// Undecided when the client paused or ended: a TLS record cut short is still
			// TLS; anything else is opaque.
			guess := Result{Protocol: TCP}
			if res, _ := classify(buf); res.Protocol == TLS {
				guess = res
			}
			if timeout {
				return sc, guess, ErrTimeout
			}
			return sc, guess, nil
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
