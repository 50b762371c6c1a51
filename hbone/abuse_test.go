package hbone_test

import (
	"bytes"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
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
