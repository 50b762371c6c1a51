package hbone_test

import (
	"bytes"
	"crypto/rand"
	"io"
	"testing"

	"github.com/detour-mesh/detour/hbone"
)

func TestEchoPayloads(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	proxy := startServer(t, p, &hbone.Forwarder{})
	d := newDialer(t)
	for _, size := range []int{1, 64 << 10, 8 << 20} {
		s, err := d.Dial(ctxT(t), proxy, echo, hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, size)
		rand.Read(want)
		go func() {
			s.Write(want)
			s.CloseWrite()
		}()
		got, err := io.ReadAll(s)
		if err != nil {
			t.Fatalf("size %d: reading: %v", size, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("size %d: got %d bytes, want %d, equal=%v", size, len(got), len(want), bytes.Equal(got, want))
		}
		s.Close()
	}
}
