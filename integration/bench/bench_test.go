// Package bench measures detour's HBONE side by side with its peers in one run: plain TCP, plain
// Go TLS 1.3, and Istio's Go HBONE server. Run with `make bench`; results go to BENCHMARKS.md.
package bench

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/detour-mesh/detour/hbone"
	it "github.com/detour-mesh/detour/integration"
)

const chunk = 1 << 20

var quiet = slog.New(slog.DiscardHandler)

func init() { it.QuietIstio() }

// sinkCounter is a backend that discards and reports how much it read per connection.
func sinkCounter(b *testing.B) (string, chan int64) {
	got := make(chan int64, 16)
	return it.Backend(b, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}), got
}

// bulk writes b.N chunks on c, half-closes, and waits for the far end to count them all. Besides
// MB/s it reports the CPU time of the whole process (sender, hops and sink) per MB moved: on a
// loaded machine wall-clock throughput follows other processes' load, CPU per MB much less.
func bulk(b *testing.B, c io.Writer, closeWrite func() error, got <-chan int64) {
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	cpu0 := processCPU()
	defer func() {
		b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/(float64(b.N)*chunk/1e6), "cpu-µs/MB")
	}()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := closeWrite(); err != nil {
		b.Fatal(err)
	}
	if n := <-got; n != int64(b.N)*chunk {
		b.Fatalf("sink got %d bytes, want %d", n, int64(b.N)*chunk)
	}
	b.StopTimer()
}

func detourServer(b *testing.B, p *it.PKI, h hbone.Handler) string {
	l := it.Listen(b)
	srv := &hbone.Server{Handler: h, TLSConfig: p.ServerTLS, Logger: quiet}
	go srv.Serve(l)
	b.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

func dialer(b *testing.B) *hbone.Dialer {
	d := &hbone.Dialer{Logger: quiet}
	b.Cleanup(func() { d.Close() })
	return d
}

// forwardingServer runs detour's ("detour") or Istio's ("istio") HBONE server forwarding over TCP,
// and returns its address.
func forwardingServer(b *testing.B, p *it.PKI, name string) string {
	if name == "detour" {
		return detourServer(b, p, &hbone.Forwarder{})
	}
	return it.IstioServer(b, p, 0).Addr().String()
}

// discard is an HBONE handler that reads a stream to its end and reports the count.
func discard(got chan<- int64) hbone.Handler {
	return hbone.HandlerFunc(func(s *hbone.Stream) error {
		if err := s.Accept(); err != nil {
			return err
		}
		n, err := io.Copy(io.Discard, s)
		got <- n
		return err
	})
}

// BenchmarkBulk: one stream, client to server, 1 MiB writes.
//   - tcp: plain TCP to the sink; tls: plain Go TLS 1.3 (same certificates) to a TLS sink.
//   - hbone: detour's dialer to detour's server, which reads the stream itself (one hop, like tls).
//   - detour-forward / istio-forward: detour's dialer to detour's / Istio's HBONE server, which
//     forwards to a TCP sink (two hops).
func BenchmarkBulk(b *testing.B) {
	p := it.NewPKI(b)
	ctx := context.Background()
	b.Run("tcp", func(b *testing.B) {
		sink, got := sinkCounter(b)
		c, err := net.Dial("tcp", sink)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		bulk(b, c, c.(*net.TCPConn).CloseWrite, got)
	})
	b.Run("tls", func(b *testing.B) {
		got := make(chan int64, 1)
		l := tls.NewListener(it.Listen(b), p.ServerTLS)
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			n, _ := io.Copy(io.Discard, c)
			got <- n
		}()
		c, err := tls.Dial("tcp", l.Addr().String(), p.ClientTLS)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		bulk(b, c, c.CloseWrite, got)
	})
	b.Run("hbone", func(b *testing.B) {
		got := make(chan int64, 1)
		proxy := detourServer(b, p, discard(got))
		s, err := dialer(b).Dial(ctx, proxy, "10.0.0.1:80", hbone.DialOptions{TLSConfig: p.ClientTLS})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		bulk(b, s, s.CloseWrite, got)
	})
	for _, name := range []string{"detour-forward", "istio-forward"} {
		b.Run(name, func(b *testing.B) {
			sink, got := sinkCounter(b)
			proxy := forwardingServer(b, p, strings.TrimSuffix(name, "-forward"))
			s, err := dialer(b).Dial(ctx, proxy, sink, hbone.DialOptions{TLSConfig: p.ClientTLS})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			bulk(b, s, s.CloseWrite, got)
		})
	}
}

// BenchmarkConnect: a new stream per request on a warm connection, 1 KiB echoed, then closed;
// reports requests/s and the p50/p99 round trip, for detour's and Istio's server (both reached
// with detour's dialer, both forwarding to the same TCP echo backend).
func BenchmarkConnect(b *testing.B) {
	p := it.NewPKI(b)
	echo := it.Echo(b)
	for _, name := range []string{"detour", "istio"} {
		b.Run(name, func(b *testing.B) {
			proxy := forwardingServer(b, p, name)
			d := dialer(b)
			opts := hbone.DialOptions{TLSConfig: p.ClientTLS}
			msg := make([]byte, 1024)
			buf := make([]byte, 1024)
			once := func() time.Duration {
				start := time.Now()
				s, err := d.Dial(context.Background(), proxy, echo, opts)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := s.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(s, buf); err != nil {
					b.Fatal(err)
				}
				el := time.Since(start)
				s.Close()
				return el
			}
			latencies(b, once)
		})
	}
}

// latencies runs once b.N times after a warm-up and reports requests/s and the p50/p99 of what
// once returned.
func latencies(b *testing.B, once func() time.Duration) {
	once() // warm the connection
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		lat = append(lat, once())
	}
	el := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/el.Seconds(), "req/s")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkIdleStreams measures memory per idle stream: open 2000 streams through the server to
// a TCP echo backend, all in this process (client, server, backend), and subtract 2000 plain TCP
// connections to the backend. The result is what HBONE adds per stream, both ends of the tunnel
// plus the proxy's upstream socket. It measures once per call, whatever b.N.
func BenchmarkIdleStreams(b *testing.B) {
	const n = 2000
	p := it.NewPKI(b)
	echo := it.Echo(b)
	// measure opens n connections with open and returns the memory they hold, per connection;
	// then closes them and waits for their goroutines to wind down.
	var stack float64 // the last measure's stack bytes per connection
	measure := func(open func() io.Closer) float64 {
		before := memInUse()
		st0, _, _ := memParts()
		conns := make([]io.Closer, 0, n)
		for range n {
			conns = append(conns, open())
		}
		time.Sleep(200 * time.Millisecond)
		after := memInUse()
		st1, _, _ := memParts()
		stack = float64(st1-st0) / n
		if f := os.Getenv("DETOUR_BENCH_IDLEPROFILE"); f != "" {
			writeProfiles(b, f)
		}
		for _, c := range conns {
			c.Close()
		}
		time.Sleep(500 * time.Millisecond)
		return (float64(after) - float64(before)) / n
	}
	tcp := func() io.Closer {
		c, err := net.Dial("tcp", echo)
		if err != nil {
			b.Fatal(err)
		}
		c.Write([]byte("x"))
		io.ReadFull(c, make([]byte, 1))
		return c
	}
	for _, name := range []string{"detour", "istio"} {
		b.Run(name, func(b *testing.B) {
			proxy := forwardingServer(b, p, name)
			d := &hbone.Dialer{Logger: quiet, Config: hbone.Config{MaxConcurrentStreams: 250}}
			defer d.Close()
			stream := func() io.Closer {
				s, err := d.Dial(context.Background(), proxy, echo, hbone.DialOptions{TLSConfig: p.ClientTLS})
				if err != nil {
					b.Fatal(err)
				}
				s.Write([]byte("x"))
				io.ReadFull(s, make([]byte, 1))
				return s
			}
			stream().Close() // warm
			// One measurement per run, whatever b.N: run with -benchtime 1x, or read each run.
			perTCP := measure(tcp)
			tcpStack := stack
			perStream := measure(stream)
			b.ReportMetric(stack-tcpStack, "B-stack/idle-stream")
			b.ReportMetric(perStream-perTCP, "B/idle-stream")
			b.ReportMetric(perTCP, "B/tcp-conn")
		})
	}
}

// memParts is the stack and heap in use and the live heap objects (call it right after
// memInUse, whose GCs leave only live objects).
func memParts() (stack, heap, live int64) {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.StackInuse), int64(m.HeapInuse), int64(m.HeapAlloc)
}

func memInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// processCPU is the user and system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
