package hbone_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"slices"
	"testing"
	"time"

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

// TestStreamContext: a Stream's Context (the stream itself, its Done channel made on demand)
// behaves as a context.Context: contexts derived from it and context.AfterFunc end with the
// stream, a stopped AfterFunc does not run, and a Done asked for after the end is closed.
func TestStreamContext(t *testing.T) {
	p := newPKI(t)
	type result struct {
		derivedErr, lateErr error
		ranAfter, ranLate   bool
		stoppedRan          bool
		stopped             bool
	}
	got := make(chan result, 1)
	proxy := startServer(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		ctx := s.Context()
		if ctx.Err() != nil || s.Context() != ctx {
			t.Errorf("open stream: Err() = %v, Context() the same: %v", ctx.Err(), s.Context() == ctx)
		}
		derived, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		ran := make(chan struct{})
		context.AfterFunc(ctx, func() { close(ran) })
		stoppedRan := make(chan struct{})
		stop := context.AfterFunc(ctx, func() { close(stoppedRan) })
		var r result
		r.stopped = stop()
		if err := s.Accept(); err != nil {
			return err
		}
		select {
		case <-derived.Done(): // the client resets the stream
		case <-time.After(10 * time.Second):
			t.Error("derived context not done 10 s after the reset")
		}
		r.derivedErr = context.Cause(derived)
		select {
		case <-ran:
			r.ranAfter = true
		case <-time.After(10 * time.Second):
		}
		late := make(chan struct{})
		context.AfterFunc(ctx, func() { close(late) })
		select {
		case <-late:
			r.ranLate = true
		case <-time.After(10 * time.Second):
		}
		select {
		case <-stoppedRan:
			r.stoppedRan = true
		default:
		}
		select {
		case <-ctx.Done():
		default:
			t.Error("Done not closed after the stream ended")
		}
		r.lateErr = ctx.Err()
		got <- r
		return nil
	}))
	s, err := newDialer(t).Dial(ctxT(t), proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
	if err != nil {
		t.Fatal(err)
	}
	s.Close() // RST_STREAM(CANCEL): the server's stream ends
	var r result
	select {
	case r = <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("handler did not finish")
	}
	want := result{derivedErr: context.Canceled, lateErr: context.Canceled, ranAfter: true, ranLate: true, stopped: true}
	if r != want {
		t.Fatalf("got %+v, want %+v", r, want)
	}
}

// TestStreamContextAfterEnd: a Context first asked for once the stream is gone is done.
func TestStreamContextAfterEnd(t *testing.T) {
	p := newPKI(t)
	ended := make(chan *hbone.Stream, 1)
	proxy := startServer(t, p, hbone.HandlerFunc(func(s *hbone.Stream) error {
		if err := s.Accept(); err != nil {
			return err
		}
		io.Copy(io.Discard, s) // until the client's END_STREAM
		s.CloseWrite()         // both sides done: the stream is gone
		ended <- s
		return nil
	}))
	s, err := newDialer(t).Dial(ctxT(t), proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: p.clientTLS, ServerID: serverID})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.CloseWrite()
	io.Copy(io.Discard, s)
	var srv *hbone.Stream
	select {
	case srv = <-ended:
	case <-time.After(30 * time.Second):
		t.Fatal("handler did not finish")
	}
	for _, st := range []*hbone.Stream{s, srv} {
		select {
		case <-st.Context().Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("stream %d: Done not closed after both sides ended", st.ID())
		}
		if err := st.Context().Err(); err != context.Canceled {
			t.Fatalf("stream %d: Err() = %v, want context.Canceled", st.ID(), err)
		}
	}
}
