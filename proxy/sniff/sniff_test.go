package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"testing/synctest"
	"time"
)

// clientHello captures the first flight of a real crypto/tls client.
func clientHello(t testing.TB, serverName string) []byte {
	a, b := net.Pipe()
	go func() {
		c := tls.Client(a, &tls.Config{ServerName: serverName, InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		c.Handshake()
	}()
	buf := make([]byte, 8192)
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := b.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
	b.Close()
	return buf[:n]
}

func sniffBytes(t *testing.T, chunks ...[]byte) (*Conn, Result, []byte) {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	var all []byte
	go func() {
		for _, c := range chunks {
			if c == nil {
				time.Sleep(60 * time.Millisecond)
				continue
			}
			a.Write(c)
		}
	}()
	for _, c := range chunks {
		all = append(all, c...)
	}
	sc, res, err := Sniff(b, 10*time.Second) // decided by the bytes; the wait is a hang guard
	if err != nil {
		t.Fatal(err)
	}
	return sc, res, all
}

func TestSniff(t *testing.T) {
	hello := clientHello(t, "echo.example.com")
	for _, tc := range []struct {
		name   string
		chunks [][]byte
		want   Result
	}{
		{"http/1.1", [][]byte{[]byte("GET /x HTTP/1.1\r\nHost: a\r\n\r\n")}, Result{Protocol: HTTP1}},
		{"http/1.1 split in the method", [][]byte{[]byte("PO"), nil, []byte("ST / HTTP/1.1\r\n\r\n")}, Result{Protocol: HTTP1}},
		{"h2 prior knowledge", [][]byte{[]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04")}, Result{Protocol: HTTP2}},
		{"tls with SNI", [][]byte{hello}, Result{Protocol: TLS, SNI: "echo.example.com"}},
		{"tls split", [][]byte{hello[:3], nil, hello[3:]}, Result{Protocol: TLS, SNI: "echo.example.com"}},
		{"binary", [][]byte{{0, 1, 2, 3}}, Result{Protocol: TCP}},
		{"text that is no method", [][]byte{[]byte("HELO example.com\r\n")}, Result{Protocol: TCP}},
		{"redis", [][]byte{[]byte("*1\r\n$4\r\nPING\r\n")}, Result{Protocol: TCP}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc, res, all := sniffBytes(t, tc.chunks...)
			if res != tc.want {
				t.Fatalf("got %+v, want %+v", res, tc.want)
			}
			// Every peeked byte is replayed, in order.
			got := make([]byte, len(all))
			sc.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := io.ReadFull(sc, got); err != nil || !bytes.Equal(got, all) {
				t.Fatalf("replay: %q, %v", got, err)
			}
		})
	}
	if _, _, ok := clientHelloSNI(clientHello(t, "")); !ok {
		t.Fatal("a ClientHello without SNI is still TLS")
	}
}

// A client that says nothing first runs the wait out: ErrTimeout, a TCP guess, nothing consumed,
// and the stream still usable (the caller decides whether to carry it on).
func TestServerSpeaksFirst(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	sc, res, err := Sniff(b, 50*time.Millisecond)
	if !errors.Is(err, ErrTimeout) || res.Protocol != TCP || len(sc.buf) != 0 {
		t.Fatalf("got %+v %v, want TCP and %v", res, err, ErrTimeout)
	}
	go a.Write([]byte("late"))
	got := make([]byte, 4)
	sc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(sc, got); err != nil || string(got) != "late" {
		t.Fatalf("got %q %v", got, err)
	}
}

// The default wait is Envoy's listener filter timeout, which Istio's waypoint keeps: a silent
// client is bounded by it, on a fake clock (testing/synctest), and no sooner.
func TestDefaultWaitBoundsSilentClient(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe()
		defer a.Close()
		start := time.Now()
		_, res, err := Sniff(b, 0)
		if !errors.Is(err, ErrTimeout) || res.Protocol != TCP {
			t.Fatalf("got %+v %v, want TCP and %v", res, err, ErrTimeout)
		}
		if waited := time.Since(start); waited != DefaultWait {
			t.Fatalf("waited %v on the fake clock, want DefaultWait (%v)", waited, DefaultWait)
		}
	})
}

// Regression (issue 17): a ClientHello that comes 300 ms after the stream opened (later than the
// old 200 ms wait, well within Envoy's listener filter timeout) is TLS with its SNI under the
// default wait, not opaque TCP.
func TestLateClientHello(t *testing.T) {
	hello := clientHello(t, "late.example.com")
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		time.Sleep(300 * time.Millisecond)
		a.Write(hello)
	}()
	sc, res, err := Sniff(b, 0)
	if err != nil || res != (Result{Protocol: TLS, SNI: "late.example.com"}) {
		t.Fatalf("got %+v %v, want TLS with SNI late.example.com", res, err)
	}
	got := make([]byte, len(hello))
	sc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(sc, got); err != nil || !bytes.Equal(got, hello) {
		t.Fatalf("replay: %v", err)
	}
}

// The wait bounds the whole decision, not each read: a client trickling its ClientHello a byte at
// a time (each byte well within the wait) still runs it out (the old per-read bound let it hold
// the stream for as long as it trickled).
func TestTrickleBounded(t *testing.T) {
	hello := clientHello(t, "slow.example.com")
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() {
		for _, c := range hello {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := a.Write([]byte{c}); err != nil {
				return
			}
		}
	}()
	defer func() { close(done); a.Close() }()
	_, res, err := Sniff(b, 150*time.Millisecond)
	if !errors.Is(err, ErrTimeout) || res.Protocol != TLS {
		t.Fatalf("got %+v %v, want a TLS guess and %v", res, err, ErrTimeout)
	}
}

func FuzzClientHelloSNI(f *testing.F) {
	f.Add(clientHello(f, "a.example"))
	f.Add([]byte{0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		sni, complete, ok := clientHelloSNI(b)
		if !ok && sni != "" || !complete && sni != "" {
			t.Fatalf("sni %q with complete=%v ok=%v", sni, complete, ok)
		}
	})
}

func FuzzClassify(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
	f.Add(clientHello(f, "x"))
	f.Fuzz(func(t *testing.T, b []byte) {
		res, done := classify(b)
		// Deciding must be stable: more bytes never change a decided answer.
		if done {
			more, done2 := classify(append(append([]byte(nil), b...), 'x'))
			if !done2 || more.Protocol != res.Protocol {
				t.Fatalf("%q: %v then %v", b, res, more)
			}
		}
	})
}

// FuzzSniff: whatever the first flight, in whatever chunks, Sniff replays every byte it peeked,
// in order, and its answer is classify's on the bytes it held.
func FuzzSniff(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\n"), uint8(3))
	f.Add(clientHello(f, "x.example"), uint8(5))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, chunk uint8) {
		c := &chunkConn{b: b, n: int(chunk%16) + 1}
		sc, res, err := Sniff(c, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		held := append([]byte(nil), sc.buf...)
		if !bytes.HasPrefix(b, held) {
			t.Fatalf("held %q is not a prefix of %q", held, b)
		}
		if want, done := classify(held); done && want != res {
			t.Fatalf("%q: %+v, classify says %+v", held, res, want)
		}
		got, err := io.ReadAll(sc)
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("replay %q, %v; want %q", got, err, b)
		}
	})
}

// chunkConn reads b n bytes at a time, then EOF.
type chunkConn struct {
	net.Conn
	b []byte
	n int
}

func (c *chunkConn) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), c.n)], c.b)
	c.b = c.b[n:]
	return n, nil
}

func (c *chunkConn) SetReadDeadline(time.Time) error { return nil }
