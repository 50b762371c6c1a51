package hbone_test

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"slices"
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

// TestWriteBuffersFrames: buffers of every size (empty ones too, and more than one frame's
// worth) arrive whole and in order, and the caller's slice is left as it was.
func TestWriteBuffersFrames(t *testing.T) {
	p := newPKI(t)
	echo := echoServer(t)
	proxy := startServer(t, p, &hbone.Forwarder{})
	s, err := newDialer(t).Dial(ctxT(t), proxy, echo, hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var bufs net.Buffers
	var want []byte
	for _, size := range []int{0, 1, 32 << 10, 0, 5, 3 << 20, 16 << 10, 0, 100} {
		b := make([]byte, size)
		rand.Read(b)
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	orig := slices.Clone(bufs)
	done := make(chan error, 1)
	go func() {
		n, err := s.WriteBuffers(bufs)
		if err == nil && n != int64(len(want)) {
			err = fmt.Errorf("WriteBuffers = %d, want %d", n, len(want))
		}
		if err == nil {
			err = s.CloseWrite()
		}
		done <- err
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want %d, or different", len(got), len(want))
	}
	for i := range bufs {
		if len(bufs[i]) != len(orig[i]) {
			t.Fatalf("buffer %d changed length: %d, was %d", i, len(bufs[i]), len(orig[i]))
		}
	}
}
