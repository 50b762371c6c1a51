package hbone_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/detour-mesh/detour/hbone"
)

// rawClient is an HTTP/2 client that writes whatever frames a test wants.
func rawClient(t *testing.T, p *pki, addr string) (*http2.Framer, func(...string) []byte, net.Conn) {
	cfg := p.clientTLS.Clone()
	cfg.NextProtos = []string{"h2"}
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte(http2.ClientPreface))
	fr := http2.NewFramer(c, c)
	fr.WriteSettings()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	hdr := func(kv ...string) []byte {
		hb.Reset()
		for i := 0; i+1 < len(kv); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return append([]byte(nil), hb.Bytes()...)
	}
	return fr, hdr, c
}

// Opening and resetting streams in a loop cannot run more handlers at once than twice the stream
// limit (the HTTP/2 rapid reset attack, CVE-2023-44487): a handler counts until it returns.
func TestRapidResetBounded(t *testing.T) {
	p := newPKI(t)
	var running, peak, total atomic.Int32
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &hbone.Server{TLSConfig: p.serverTLS, Logger: slog.New(slog.DiscardHandler),
		Config: hbone.Config{MaxConcurrentStreams: 8},
		Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
			n := running.Add(1)
			defer running.Add(-1)
			total.Add(1)
			for {
				old := peak.Load()
				if n <= old || peak.CompareAndSwap(old, n) {
					break
				}
			}
			time.Sleep(20 * time.Millisecond) // a slow upstream dial that ignores the reset
			return hbone.ErrUnavailable
		})}
	go srv.Serve(l)
	defer srv.Close()
	fr, hdr, c := rawClient(t, p, l.Addr().String())
	go io.Copy(io.Discard, c)
	block := hdr(":method", "CONNECT", ":authority", "10.0.0.1:80")
	for i := uint32(0); i < 500; i++ {
		id := 2*i + 1
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true})
		fr.WriteRSTStream(id, http2.ErrCodeCancel)
	}
	time.Sleep(300 * time.Millisecond)
	if peak.Load() > 16 {
		t.Fatalf("%d handlers ran at once, bound 2x8", peak.Load())
	}
	if total.Load() == 0 {
		t.Fatal("no handler ran at all")
	}
}

// DATA that a peer keeps sending on a stream we reset is ignored, not answered frame by frame.
func TestDataOnResetStreamIgnored(t *testing.T) {
	p := newPKI(t)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &hbone.Server{TLSConfig: p.serverTLS, Logger: slog.New(slog.DiscardHandler),
		Handler: hbone.HandlerFunc(func(s *hbone.Stream) error { return hbone.ErrForbidden })}
	go srv.Serve(l)
	defer srv.Close()
	fr, hdr, c := rawClient(t, p, l.Addr().String())
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr(":method", "CONNECT", ":authority", "10.0.0.1:80"), EndHeaders: true})
	for range 50 {
		fr.WriteData(1, false, []byte("late data"))
	}
	fr.WritePing(false, [8]byte{9})
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	rsts := 0
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := f.(*http2.RSTStreamFrame); ok {
			rsts++
		}
		if pf, ok := f.(*http2.PingFrame); ok && pf.IsAck() {
			break
		}
	}
	if rsts > 1 {
		t.Fatalf("%d RST_STREAM frames for one refused stream", rsts)
	}
}

// abuseServer runs a server with MaxConcurrentStreams 8 whose handler holds each stream until
// the peer resets it (a slow upstream dial that gives up on the reset), and returns a raw client
// with a reader goroutine that reports the GOAWAY code it sees and then the end of the connection.
func abuseServer(t *testing.T) (*hbone.Server, *http2.Framer, func(...string) []byte, net.Conn, <-chan http2.ErrCode, *atomic.Int32) {
	p := newPKI(t)
	var started atomic.Int32
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &hbone.Server{TLSConfig: p.serverTLS, Logger: slog.New(slog.DiscardHandler),
		Config: hbone.Config{MaxConcurrentStreams: 8},
		Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
			started.Add(1)
			<-s.Context().Done()
			return hbone.ErrUnavailable
		})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	fr, hdr, c := rawClient(t, p, l.Addr().String())
	goaway := make(chan http2.ErrCode, 1)
	rfr := http2.NewFramer(io.Discard, c)
	go func() {
		defer close(goaway)
		for {
			f, err := rfr.ReadFrame()
			if err != nil {
				return
			}
			if ga, ok := f.(*http2.GoAwayFrame); ok {
				goaway <- ga.ErrCode
				io.Copy(io.Discard, c)
				return
			}
		}
	}()
	return srv, fr, hdr, c, goaway, &started
}

// expectCalm waits for the GOAWAY(ENHANCE_YOUR_CALM) and the end of the connection.
func expectCalm(t *testing.T, goaway <-chan http2.ErrCode, what string) {
	t.Helper()
	select {
	case code, ok := <-goaway:
		if !ok {
			t.Fatalf("%s: the connection ended without a GOAWAY", what)
		}
		if code != http2.ErrCodeEnhanceYourCalm {
			t.Fatalf("%s: GOAWAY %v, want ENHANCE_YOUR_CALM", what, code)
		}
	case <-time.After(20 * time.Second): // a hang guard, not a timing assertion
		t.Fatalf("%s: the connection was never closed", what)
	}
	if _, ok := <-goaway; ok {
		t.Fatalf("%s: a second GOAWAY", what)
	}
}

// HTTP/2 rapid reset (CVE-2023-44487): a peer that opens and resets streams in a loop loses its
// connection, as with Go's net/http and Envoy, instead of being refused stream by stream forever.
func TestRapidResetClosesConnection(t *testing.T) {
	_, fr, hdr, c, goaway, started := abuseServer(t)
	w := bufio.NewWriter(c)
	fr = http2.NewFramer(w, nil)
	block := hdr(":method", "CONNECT", ":authority", "10.0.0.1:80")
	for i := uint32(0); i < 20000; i++ {
		id := 2*i + 1
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true})
		if fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil || w.Flush() != nil {
			break // the server closed the connection
		}
	}
	expectCalm(t, goaway, "rapid reset")
	if n := started.Load(); n > 1000 {
		t.Fatalf("%d handlers started before the connection was closed", n)
	}
}

// A peer that ignores SETTINGS_MAX_CONCURRENT_STREAMS and keeps opening streams that are refused
// loses its connection.
func TestRefusedStreamFloodClosesConnection(t *testing.T) {
	_, fr, hdr, c, goaway, _ := abuseServer(t)
	w := bufio.NewWriter(c)
	fr = http2.NewFramer(w, nil)
	block := hdr(":method", "CONNECT", ":authority", "10.0.0.1:80")
	for i := uint32(0); i < 20000; i++ {
		if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2*i + 1, BlockFragment: block, EndHeaders: true}) != nil || w.Flush() != nil {
			break
		}
	}
	expectCalm(t, goaway, "refused-stream flood")
}

// Frames that carry nothing (empty DATA, PRIORITY, unknown types, updates and resets for streams
// that are gone) cost a reader far more per byte than data does: a flood of them is cut off.
func TestNoopFrameFloodClosesConnection(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(fr *http2.Framer, i uint32) error
	}{
		{"empty DATA", func(fr *http2.Framer, i uint32) error { return fr.WriteData(1, false, nil) }},
		{"PRIORITY", func(fr *http2.Framer, i uint32) error {
			return fr.WritePriority(1, http2.PriorityParam{StreamDep: 0, Weight: 1})
		}},
		{"unknown frame type", func(fr *http2.Framer, i uint32) error { return fr.WriteRawFrame(0xfa, 0, 1, nil) }},
		{"RST_STREAM on a closed stream", func(fr *http2.Framer, i uint32) error { return fr.WriteRSTStream(3, http2.ErrCodeCancel) }},
		{"WINDOW_UPDATE on a closed stream", func(fr *http2.Framer, i uint32) error { return fr.WriteWindowUpdate(3, 1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, fr, hdr, c, goaway, _ := abuseServer(t)
			w := bufio.NewWriter(c)
			fr = http2.NewFramer(w, nil)
			block := hdr(":method", "CONNECT", ":authority", "10.0.0.1:80")
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block, EndHeaders: true})
			fr.WriteRSTStream(3, http2.ErrCodeCancel)
			for i := uint32(0); i < 200000; i++ {
				if tc.write(fr, i) != nil || i%1000 == 0 && w.Flush() != nil {
					break
				}
			}
			w.Flush()
			expectCalm(t, goaway, tc.name)
		})
	}
}

// A peer that sends and never reads cannot grow the server's write queues: past the control
// frame bound the connection is closed. Here every request is malformed (END_STREAM on the
// CONNECT headers), so each costs the server one 400 to write and nothing else.
func TestWriteQueuesBoundedForPeerThatNeverReads(t *testing.T) {
	p := newPKI(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &hbone.Server{TLSConfig: p.serverTLS, Logger: slog.New(slog.DiscardHandler),
		Handler: hbone.HandlerFunc(func(s *hbone.Stream) error { return s.Accept() })}
	go srv.Serve(smallSendBuffers{l})
	defer srv.Close()
	// Small socket buffers on both ends, so the kernel holds few of the server's answers.
	nd := &net.Dialer{Control: func(network, address string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { setRcvBuf(fd, 4096) })
	}}
	cfg := p.clientTLS.Clone()
	cfg.NextProtos = []string{"h2"}
	c, err := tls.DialWithDialer(nd, "tcp", l.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w := bufio.NewWriter(c)
	w.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(w, nil)
	fr.WriteSettings()
	var hb bytes.Buffer
	hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	block := hb.Bytes()
	const requests = 300000
	sent := 0
	for ; sent < requests; sent++ {
		if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*sent + 1), BlockFragment: block, EndHeaders: true, EndStream: true}) != nil {
			break
		}
	}
	w.Flush()
	// Let the server's reader catch up with what we sent: a PING it reads after the rest.
	fr.WritePing(false, [8]byte{1})
	w.Flush()
	for range 100 {
		time.Sleep(10 * time.Millisecond)
		if q := hbone.QueuedFrames(srv); q > 20000 {
			t.Fatalf("%d frames queued for a peer that does not read (%d requests sent), want at most 2 x 10,000", q, sent)
		}
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // a hang guard, not a timing assertion
	if _, err := io.Copy(io.Discard, c); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the connection of a peer that does not read was never closed")
		}
	}
}

// smallSendBuffers shrinks the send buffer of every accepted connection.
type smallSendBuffers struct{ net.Listener }

func (l smallSendBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetWriteBuffer(4096)
	}
	return c, err
}
