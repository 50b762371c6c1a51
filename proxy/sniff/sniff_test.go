package sniff

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"
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
	sc, res, err := Sniff(b, 100*time.Millisecond)
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

// A client that says nothing first is opaque TCP after the wait, with nothing consumed.
func TestServerSpeaksFirst(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	start := time.Now()
	sc, res, err := Sniff(b, 50*time.Millisecond)
	if err != nil || res.Protocol != TCP || len(sc.buf) != 0 {
		t.Fatalf("got %+v %v", res, err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("waited %v", el)
	}
	go a.Write([]byte("late"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(sc, got); err != nil || string(got) != "late" {
		t.Fatalf("got %q %v", got, err)
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
