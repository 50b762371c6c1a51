package hbone

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// FuzzServerFrames feeds arbitrary frames to a server connection (after the preface, with no
// TLS): it must never panic, and must end within a bound once the peer goes away.
func FuzzServerFrames(f *testing.F) {
	f.Add(seedFrames(func(fr *http2.Framer, hdr func(...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr(":method", "CONNECT", ":authority", "10.0.0.1:80"), EndHeaders: true})
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteWindowUpdate(0, 1000)
		fr.WriteWindowUpdate(1, 1000)
		fr.WritePing(false, [8]byte{1})
		fr.WriteData(1, true, nil)
		fr.WriteRSTStream(1, http2.ErrCodeCancel)
		fr.WriteGoAway(0, http2.ErrCodeNo, nil)
	}))
	f.Add(seedFrames(func(fr *http2.Framer, hdr func(...string) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: hdr(":method", "GET", ":path", "/"), EndHeaders: false})
		fr.WriteContinuation(3, true, hdr("x", "y"))
		fr.WriteData(5, false, []byte("idle stream"))
	}))
	f.Add(seedFrames(func(fr *http2.Framer, hdr func(...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 14})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr(":method", "CONNECT", ":authority", "a.b:1"), EndHeaders: true, EndStream: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr(":method", "CONNECT", ":authority", "a.b:1"), EndHeaders: true})
	}))
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		cfg := Config{PingInterval: -1, StreamWindow: 1 << 16, ConnWindow: 1 << 17}.withDefaults(true)
		c := newConn(a, nil, true, cfg, slog.New(slog.DiscardHandler))
		var handlers sync.WaitGroup
		c.onStream = func(s *Stream) {
			handlers.Add(1)
			go func() {
				defer handlers.Done()
				defer c.handlerDone()
				s.Accept()
				io.Copy(io.Discard, s)
				s.Write([]byte("bye"))
				s.Close()
			}()
		}
		go io.Copy(io.Discard, b)
		c.start()
		done := make(chan struct{})
		go func() { c.readLoop(); close(done) }()
		b.SetWriteDeadline(time.Now().Add(time.Second))
		b.Write(in)
		b.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("connection did not end after its peer left")
		}
		handlers.Wait()
	})
}

func seedFrames(write func(fr *http2.Framer, hdr func(...string) []byte)) []byte {
	var buf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	hdr := func(kv ...string) []byte {
		hb.Reset()
		for i := 0; i+1 < len(kv); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return append([]byte(nil), hb.Bytes()...)
	}
	write(fr, hdr)
	return buf.Bytes()
}

// FuzzClientFrames feeds arbitrary frames from a server to a client connection with two streams
// open (stream IDs 1 and 3): the Dialer and ClientConn face other ztunnels and, in the developer's
// HTTP/2 tunnel, the developer's CLI. It must never panic, every dial must return, and the
// connection must end within a bound once the peer goes away.
func FuzzClientFrames(f *testing.F) {
	f.Add(seedFrames(func(fr *http2.Framer, hdr func(...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20}, http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 14})
		fr.WriteSettingsAck()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr(":status", "200"), EndHeaders: true})
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteWindowUpdate(0, 1000)
		fr.WriteWindowUpdate(1, 1000)
		fr.WritePing(false, [8]byte{1})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: hdr(":status", "503"), EndHeaders: true, EndStream: true})
		fr.WriteData(1, true, nil)
		fr.WriteGoAway(1, http2.ErrCodeNo, nil)
	}))
	f.Add(seedFrames(func(fr *http2.Framer, hdr func(...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0}, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr(":status", "100"), EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr(":status", "200"), EndHeaders: false})
		fr.WriteContinuation(1, true, hdr("x", "y"))
		fr.WriteDataPadded(1, false, []byte("padded"), make([]byte, 7))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr("trailer", "t"), EndHeaders: true, EndStream: true})
		fr.WriteRSTStream(3, http2.ErrCodeRefusedStream)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: hdr(":status", "200"), EndHeaders: true})
	}))
	f.Add(seedFrames(func(fr *http2.Framer, hdr func(...string) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: hdr(":status", "200"), EndHeaders: true})
		fr.WriteData(3, false, make([]byte, 1<<16+1)) // past the stream window
		fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: hdr(":method", "GET"), EndHeaders: true})
		fr.WriteData(5, false, []byte("idle stream"))
	}))
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		cfg := Config{PingInterval: -1, StreamWindow: 1 << 16, ConnWindow: 1 << 17, ConnBuffer: 1 << 16}.withDefaults(false)
		c := newConn(a, nil, false, cfg, slog.New(slog.DiscardHandler))
		go io.Copy(io.Discard, b)
		c.start()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var dials sync.WaitGroup
		for range 2 {
			dials.Add(1)
			go func() {
				defer dials.Done()
				s, err := roundTrip(ctx, c, &Request{Target: Target{Addr: netip.MustParseAddrPort("10.0.0.1:80"), Port: 80}})
				if err != nil {
					return
				}
				s.Write([]byte("hi"))
				io.Copy(io.Discard, s)
				s.CloseWrite()
				s.Close()
			}()
		}
		done := make(chan struct{})
		go func() { c.readLoop(); close(done) }()
		b.SetWriteDeadline(time.Now().Add(time.Second))
		b.Write(in)
		b.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("connection did not end after its peer left")
		}
		dials.Wait()
		if ctx.Err() != nil {
			t.Fatal("a dial or its stream outlived the connection")
		}
	})
}
