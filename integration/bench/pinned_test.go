package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
)

// The Pinned benchmarks run the waypoint as its own process (the detour binary named by
// DETOUR_BENCH_BIN, `detour waypoint --config`) on CPU 1 while this process (client, backend
// HBONE terminator, backend) runs on CPU 0 (`make bench-waypoint` starts it under taskset).
// "direct" runs the same client and terminator on CPU 0 with no waypoint. That is the waypoint on
// its own node, as Istio and ztunnel measure it; with everything on two shared cores the
// waypoint's extra decrypt and encrypt halve any hop (see BENCHMARKS.md). The waypoint's own CPU
// time is read from /proc, so CPU per request needs no pinning to be right.

// waypointCPU is the CPU the waypoint process is pinned to (DETOUR_BENCH_WAYPOINT_CPUS overrides,
// e.g. 0-1 for no pinning).
const waypointCPU = "1"

// externalWaypoint starts the waypoint process for service echo (10.96.0.10:80 -> the endpoint
// 127.0.0.2:targetPort behind the terminator on terminatorPort) and returns its HBONE address and
// a reading of its CPU time.
func externalWaypoint(b *testing.B, caDir string, terminatorPort, targetPort int, inspect string) (string, func() time.Duration) {
	return externalWaypointWith(b, caDir, terminatorPort, targetPort, inspect, "echo", "")
}

// externalWaypointWith is externalWaypoint with the port's name (e.g. "http" declares HTTP;
// "echo" declares nothing, so it is sniffed) and more of discovery.static (policies,
// requestAuthentications: YAML indented for that mapping).
func externalWaypointWith(b *testing.B, caDir string, terminatorPort, targetPort int, inspect, portName, static string) (string, func() time.Duration) {
	bin := os.Getenv("DETOUR_BENCH_BIN")
	if bin == "" {
		b.Skip("DETOUR_BENCH_BIN is not set: run `make bench-waypoint`")
	}
	hboneAddr, health := freeAddr(b), freeAddr(b)
	cfg := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: %q}}
listeners: {hbone: %q, health: %q, tunnel: "off", upstreamHBONEPort: %d}
waypoint: {namespace: demo, inspect: %s}
discovery:
  static:
    services:
    - name: echo
      namespace: demo
      vips: [10.96.0.10]
      ports: [{name: %s, port: 80, targetPort: %d}]
      endpoints: [{ip: 127.0.0.2, serviceAccount: echo}]
`, caDir, it.ServerID, hboneAddr, health, terminatorPort, inspect, portName, targetPort) + static
	path := filepath.Join(b.TempDir(), "waypoint.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	cpus := waypointCPU
	if v := os.Getenv("DETOUR_BENCH_WAYPOINT_CPUS"); v != "" {
		cpus = v
	}
	cmd := exec.Command("taskset", "-c", cpus, bin, "waypoint", "--config", path)
	var logs bytes.Buffer
	cmd.Stderr = &logs // read only after Wait
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		if err := cmd.Wait(); err != nil {
			b.Errorf("waypoint process: %v\n%s", err, logs.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + health + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			b.Fatalf("the waypoint process never got ready: %v\n%s", err, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return hboneAddr, func() time.Duration { return procCPU(b, cmd.Process.Pid) }
}

func freeAddr(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// procCPU is a process's user+system CPU time (all threads), from /proc/PID/stat.
func procCPU(b *testing.B, pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * (time.Second / 100) // USER_HZ is 100 on Linux
}

// pinnedBed: a persisted dev CA, the backend terminator on 127.0.0.2 (in this process) and the
// waypoint process.
type pinnedBed struct {
	waypointBed
	cpu func() time.Duration
}

func newPinnedBed(b *testing.B, targetPort int, inspect string) *pinnedBed {
	return newPinnedBedWith(b, targetPort, inspect, "echo", "")
}

// newPinnedBedWith is newPinnedBed with more of discovery.static (see externalWaypointWith).
func newPinnedBedWith(b *testing.B, targetPort int, inspect, portName, static string) *pinnedBed {
	caDir := filepath.Join(b.TempDir(), "ca")
	ca, err := devca.Init(caDir, "cluster.local")
	if err != nil {
		b.Fatal(err)
	}
	issue := func(id string) identity.Source {
		svid, err := ca.Issue(id, time.Time{}, time.Time{})
		if err != nil {
			b.Fatal(err)
		}
		return identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()})
	}
	bl, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		b.Fatal(err)
	}
	backend := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(issue("spiffe://cluster.local/ns/demo/sa/echo"), nil), Logger: quiet}
	go backend.Serve(bl)
	b.Cleanup(func() { backend.Close() })
	wp, cpu := externalWaypointWith(b, caDir, bl.Addr().(*net.TCPAddr).Port, targetPort, inspect, portName, static)
	client := issue(it.ClientID)
	directTLS, _ := identity.ClientTLS(client, spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo"))
	wpTLS, _ := identity.ClientTLS(client, spiffeid.RequireFromString(it.ServerID))
	return &pinnedBed{cpu: cpu, waypointBed: waypointBed{direct: bl.Addr().String(), viaWaypoint: wp,
		directTLS: hbone.DialOptions{TLSConfig: directTLS}, wpTLS: hbone.DialOptions{TLSConfig: wpTLS}}}
}

// BenchmarkPinnedBulk: one bulk stream, directly to the terminator or through the waypoint
// process on its own CPU. Reports the waypoint's CPU seconds per GB moved.
func BenchmarkPinnedBulk(b *testing.B) {
	for _, name := range []string{"direct", "waypoint"} {
		b.Run(name, func(b *testing.B) {
			got := make(chan int64, 1)
			sink := backendOn(b, func(c *net.TCPConn) { n, _ := io.Copy(io.Discard, c); got <- n })
			w := newPinnedBed(b, sink, "auto")
			s, err := w.dial(b, dialer(b), name, sink)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			cpu0 := w.cpu()
			bulk(b, s, s.CloseWrite, got)
			if name == "waypoint" {
				b.ReportMetric((w.cpu()-cpu0).Seconds()/(float64(b.N)*chunk/1e9), "wp-cpu-s/GB")
			}
		})
	}
}

// BenchmarkPinnedConnect: a new stream per 1 KiB echo on warm connections, sequential (moderate
// load): p50/p99 directly and through the waypoint process.
func BenchmarkPinnedConnect(b *testing.B) {
	for _, name := range []string{"direct", "waypoint"} {
		b.Run(name, func(b *testing.B) {
			echo := backendOn(b, func(c *net.TCPConn) { io.Copy(c, c) })
			w := newPinnedBed(b, echo, "auto")
			d := dialer(b)
			msg, buf := make([]byte, 1024), make([]byte, 1024)
			latencies(b, func() time.Duration {
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
			})
		})
	}
}

// BenchmarkPinnedHTTP: HTTP/1.1 keep-alive requests (1 KiB echoed) from 8 client connections
// through the waypoint process with inspect: always (every request parsed, authorized, balanced
// and counted), directly for comparison. Reports the waypoint's CPU per 1000 req/s: vCPU it
// would need to carry 1000 requests a second (Envoy's waypoint: about 0.25; bar 0.1).
func BenchmarkPinnedHTTP(b *testing.B) {
	const conns = 8
	for _, name := range []string{"direct", "waypoint"} {
		b.Run(name, func(b *testing.B) {
			app := backendHTTP(b)
			w := newPinnedBed(b, app, "always")
			d := dialer(b)
			target := "10.96.0.10:80"
			if name == "direct" {
				target = "127.0.0.2:" + strconv.Itoa(app)
			}
			tr := &http.Transport{MaxConnsPerHost: conns, MaxIdleConnsPerHost: conns, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return w.dial(b, d, name, app)
			}}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr}
			msg := bytes.Repeat([]byte("x"), 1024)
			do := func() {
				resp, err := c.Post("http://"+target+"/echo", "application/octet-stream", bytes.NewReader(msg))
				if err != nil {
					b.Fatal(err)
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || n != int64(len(msg)) {
					b.Fatalf("%d, %d bytes", resp.StatusCode, n)
				}
			}
			var cpu func() time.Duration
			if name == "waypoint" {
				cpu = w.cpu
			}
			runParallel(b, conns, func(int) { do() }, cpu)
		})
	}
}

// runParallel warms each of n connections with one do(i), then shares b.N calls of do among
// them, one goroutine per connection, and reports req/s and, when cpu is not nil, the waypoint
// process's CPU per 1000 req/s.
func runParallel(b *testing.B, n int, do func(i int), cpu func() time.Duration) {
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { do(i) }) // warm every connection
	}
	wg.Wait()
	var left atomic.Int64
	left.Store(int64(b.N))
	var cpu0 time.Duration
	if cpu != nil {
		cpu0 = cpu()
	}
	b.ResetTimer()
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				do(i)
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/el.Seconds(), "req/s")
	if cpu != nil {
		b.ReportMetric((cpu()-cpu0).Seconds()/float64(b.N)*1000, "wp-vCPU/1000rps")
	}
}

// backendHTTP runs an HTTP/1.1 echo app on 127.0.0.2 and returns its port.
func backendHTTP(b *testing.B) int {
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Write(body)
	})}
	go srv.Serve(l)
	b.Cleanup(func() { srv.Close() })
	return l.Addr().(*net.TCPAddr).Port
}
