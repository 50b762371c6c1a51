package bench

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// waypointBed: a backend HBONE terminator (detour's server with a Forwarder, standing in for the
// destination ztunnel) on 127.0.0.2, and detour's waypoint on 127.0.0.1 for a service whose one
// endpoint is 127.0.0.2.
type waypointBed struct {
	direct, viaWaypoint string // where the client connects
	// viaRouted is a second waypoint where a TCPRoute sends echo's streams to echo-v2 (the same
	// endpoint): what a TCPRoute adds per connection.
	viaRouted        string
	directTLS, wpTLS hbone.DialOptions
}

func newWaypointBed(b *testing.B, sinkPort int) *waypointBed {
	return newWaypointBedWith(b, sinkPort, &hbone.Forwarder{})
}

// newWaypointBedWith is newWaypointBed whose backend terminator runs backend instead of a
// Forwarder to sinkPort.
func newWaypointBedWith(b *testing.B, sinkPort int, backend hbone.Handler) *waypointBed {
	p := it.NewPKI(b)
	issue := func(id string) identity.Source { return p.Source(b, id) }
	backendID := issue("spiffe://cluster.local/ns/demo/sa/echo")
	bl, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		b.Fatal(err)
	}
	bsrv := &hbone.Server{Handler: backend, TLSConfig: identity.ServerTLS(backendID, nil), Logger: quiet}
	go bsrv.Serve(bl)
	b.Cleanup(func() { bsrv.Close() })
	port := uint16(bl.Addr().(*net.TCPAddr).Port)
	svc := func(name, vip string) *route.Service {
		return &route.Service{Name: name, Namespace: "demo", Hostname: name + ".demo.svc.cluster.local",
			VIPs:      []netip.Addr{netip.MustParseAddr(vip)},
			Ports:     []route.Port{{Name: "tcp", Port: 80, TargetPort: uint16(sinkPort)}},
			Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("127.0.0.2"), Ready: true, ServiceAccount: "echo"}}}
	}
	table, err := route.NewTable([]*route.Service{svc("echo", "10.96.0.10"), svc("echo-v2", "10.96.0.11")})
	if err != nil {
		b.Fatal(err)
	}
	tcp, err := l4route.DecodeTCPRoute([]byte(`{metadata: {name: to-v2, namespace: demo}, spec: {parentRefs: [{name: echo}], rules: [{backendRefs: [{name: echo-v2, port: 80}]}]}}`))
	if err != nil {
		b.Fatal(err)
	}
	l4, err := l4route.Compile(table, "demo", []*l4route.TCPRoute{tcp}, nil)
	if err != nil {
		b.Fatal(err)
	}
	wpID := issue(it.ServerID)
	onward := &hbone.Dialer{Logger: quiet}
	b.Cleanup(func() { onward.Close() })
	wpAddr := detourServer(b, p, &waypoint.Handler{Routes: func() *route.Table { return table }, Identity: wpID, Dialer: onward, HBONEPort: port, Logger: quiet})
	routedAddr := detourServer(b, p, &waypoint.Handler{Routes: func() *route.Table { return table }, Identity: wpID, Dialer: onward, HBONEPort: port, Logger: quiet,
		L4Routes: func() *l4route.Table { return l4 }})
	client := issue(it.ClientID)
	directTLS, _ := identity.ClientTLS(client, spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo"))
	wpTLS, _ := identity.ClientTLS(client, spiffeid.RequireFromString(it.ServerID))
	return &waypointBed{direct: bl.Addr().String(), viaWaypoint: wpAddr, viaRouted: routedAddr,
		directTLS: hbone.DialOptions{TLSConfig: directTLS}, wpTLS: hbone.DialOptions{TLSConfig: wpTLS}}
}

func (w *waypointBed) dial(b *testing.B, d *hbone.Dialer, name string, sinkPort int) (*hbone.Stream, error) {
	switch name {
	case "direct":
		return d.Dial(context.Background(), w.direct, "127.0.0.2:"+strconv.Itoa(sinkPort), w.directTLS)
	case "tcproute":
		return d.Dial(context.Background(), w.viaRouted, "10.96.0.10:80", w.wpTLS)
	}
	return d.Dial(context.Background(), w.viaWaypoint, "10.96.0.10:80", w.wpTLS)
}

// backendOn runs serve for each connection on 127.0.0.2 and returns the port.
func backendOn(b *testing.B, serve func(*net.TCPConn)) int {
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); serve(c.(*net.TCPConn)) }()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

// BenchmarkWaypointBulk: one stream client -> detour waypoint -> backend HBONE terminator -> sink,
// against client -> backend HBONE terminator -> sink directly.
func BenchmarkWaypointBulk(b *testing.B) {
	for _, name := range []string{"direct", "waypoint"} {
		b.Run(name, func(b *testing.B) {
			got := make(chan int64, 1)
			sink := backendOn(b, func(c *net.TCPConn) { n, _ := io.Copy(io.Discard, c); got <- n })
			w := newWaypointBed(b, sink)
			d := dialer(b)
			s, err := w.dial(b, d, name, sink)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			bulk(b, s, s.CloseWrite, got)
		})
	}
}

// BenchmarkWaypointConnect: a new stream per 1 KiB echo on warm connections, sequential
// (moderate load); p50/p99 through the waypoint against directly, and through a waypoint where
// a TCPRoute sends the stream to another service (tcproute).
func BenchmarkWaypointConnect(b *testing.B) {
	for _, name := range []string{"direct", "waypoint", "tcproute"} {
		b.Run(name, func(b *testing.B) {
			echo := backendOn(b, func(c *net.TCPConn) { io.Copy(c, c) })
			w := newWaypointBed(b, echo)
			d := dialer(b)
			msg, buf := make([]byte, 1024), make([]byte, 1024)
			once := func() time.Duration {
				start := time.Now()
				s, err := w.dial(b, d, name, echo)
				if err != nil {
					b.Fatal(err)
				}
				s.Write(msg)
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

// BenchmarkWaypointIdle measures what the waypoint holds per idle proxied stream: 1000 idle
// streams through the waypoint minus 1000 idle streams straight to the backend terminator (the
// client, terminator and backend cost the same in both). Measured once per call.
func BenchmarkWaypointIdle(b *testing.B) {
	echo := backendOn(b, func(c *net.TCPConn) { io.Copy(c, c) })
	waypointIdle(b, newWaypointBed(b, echo), echo, 1000)
}

// BenchmarkWaypointIdle10k holds 10,000 idle proxied streams at once (goal 4 of issue 21): the
// backend terminator echoes on the stream itself (10,000 TCP sockets to a backend would need
// more descriptors than the machine allows), and the process's peak RSS is reported beside the
// waypoint's bytes per stream. The RSS counts everything in the process: the client's and the
// backend's 10,000 streams too.
func BenchmarkWaypointIdle10k(b *testing.B) {
	echo := hbone.HandlerFunc(func(s *hbone.Stream) error {
		if err := s.Accept(); err != nil {
			return err
		}
		_, err := io.Copy(s, s)
		return err
	})
	const port = 9 // the echo handler ignores the target
	waypointIdle(b, newWaypointBedWith(b, port, echo), port, 10000)
}

// waypointIdle measures the memory n idle streams hold through the waypoint minus n idle streams
// straight to the backend terminator, in bytes per stream (total, stacks, heap), and the peak RSS.
func waypointIdle(b *testing.B, w *waypointBed, sink, n int) {
	d := &hbone.Dialer{Logger: quiet, Config: hbone.Config{MaxConcurrentStreams: 250}}
	defer d.Close()
	var stackDelta, heapDelta, liveDelta float64
	var rss int64
	measure := func(name string) float64 {
		before := memInUse()
		st0, hp0, lv0 := memParts()
		streams := make([]*hbone.Stream, 0, n)
		for range n {
			s, err := w.dial(b, d, name, sink)
			if err != nil {
				b.Fatal(err)
			}
			s.Write([]byte("x"))
			io.ReadFull(s, make([]byte, 1))
			streams = append(streams, s)
		}
		time.Sleep(200 * time.Millisecond)
		after := memInUse()
		st1, hp1, lv1 := memParts()
		if f := os.Getenv("DETOUR_BENCH_HEAPPROFILE"); f != "" && name == "waypoint" {
			writeProfiles(b, f)
		}
		if name == "waypoint" {
			rss = residentBytes(b)
		}
		stackDelta, heapDelta, liveDelta = float64(st1-st0)/float64(n), float64(hp1-hp0)/float64(n), float64(lv1-lv0)/float64(n)
		for _, s := range streams {
			s.Close()
		}
		time.Sleep(500 * time.Millisecond)
		return (float64(after) - float64(before)) / float64(n)
	}
	measure("direct") // warm pools and connections
	direct := measure("direct")
	directStack, directHeap, directLive := stackDelta, heapDelta, liveDelta
	via := measure("waypoint")
	b.ReportMetric(via-direct, "B/waypoint-stream")
	b.ReportMetric(stackDelta-directStack, "B-stack/waypoint-stream")
	b.ReportMetric(heapDelta-directHeap, "B-heap/waypoint-stream")
	// Live objects only; B-heap adds the free space in the spans they occupy.
	b.ReportMetric(liveDelta-directLive, "B-live/waypoint-stream")
	b.ReportMetric(float64(rss)/(1<<20), "MiB-rss")
}

// residentBytes is the process's resident set (VmRSS), 0 where /proc is not there.
func residentBytes(b *testing.B) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				b.Fatalf("reading VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	return 0
}

// writeProfiles writes the heap and goroutine profiles at the peak (DETOUR_BENCH_HEAPPROFILE).
func writeProfiles(b *testing.B, path string) {
	for _, p := range []string{"heap", "goroutine"} {
		f, err := os.Create(path + "." + p)
		if err != nil {
			b.Fatal(err)
		}
		pprof.Lookup(p).WriteTo(f, 0)
		f.Close()
	}
}

// BenchmarkConnectParallel (goal 3 of issue 21): new CONNECT streams per second with 64 in
// flight on one warm client connection (the dialer's 100 streams per connection are never
// reached), each stream one byte echoed and closed: through detour's waypoint to a backend
// terminator ("waypoint"), and, beside it in the same run, one forwarding hop through detour's
// Forwarder ("detour") and through Istio's Go HBONE server ("istio"), both to a TCP echo.
func BenchmarkConnectParallel(b *testing.B) {
	const inFlight = 64
	for _, name := range []string{"waypoint", "detour", "istio"} {
		b.Run(name, func(b *testing.B) {
			var dial func(d *hbone.Dialer) (*hbone.Stream, error)
			if name == "waypoint" {
				echo := backendOn(b, func(c *net.TCPConn) { io.Copy(c, c) })
				w := newWaypointBed(b, echo)
				dial = func(d *hbone.Dialer) (*hbone.Stream, error) { return w.dial(b, d, "waypoint", echo) }
			} else {
				p := it.NewPKI(b)
				echo := it.Echo(b)
				proxy := forwardingServer(b, p, name)
				opts := hbone.DialOptions{TLSConfig: p.ClientTLS}
				dial = func(d *hbone.Dialer) (*hbone.Stream, error) { return d.Dial(context.Background(), proxy, echo, opts) }
			}
			d := dialer(b)
			once := func(buf []byte) error {
				s, err := dial(d)
				if err != nil {
					return err
				}
				defer s.Close()
				if _, err := s.Write(buf); err != nil {
					return err
				}
				_, err = io.ReadFull(s, buf)
				return err
			}
			if err := once(make([]byte, 1)); err != nil { // warm the connections
				b.Fatal(err)
			}
			b.SetParallelism((inFlight + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 1)
				for pb.Next() {
					if err := once(buf); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "streams/s")
		})
	}
}
