package fault

import (
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	it "github.com/detour-mesh/detour/integration"
)

// A stalled mirror consumer: 100 mirrored connections to a developer's app that accepts and never
// reads. The waypoint's goroutines stay bounded (QUIC and HTTP/2 tunnels alike), and no client's
// connection fails.
func TestStalledMirrorGoroutines(t *testing.T) {
	for _, transport := range []string{"quic", "h2"} {
		t.Run(transport, func(t *testing.T) {
			b := newBed(t, bedOptions{})
			w := b.startWaypoint(selfIP)
			stop := make(chan struct{})
			stalled := it.BackendOn(t, it.ListenAt(t, "127.0.0.1:0"), func(*net.TCPConn) { <-stop })
			t.Cleanup(func() { close(stop) }) // before BackendOn's cleanup waits for its connections
			b.cli(w, "carol", transport, "mirror", 82, stalled)
			bg := b.startLoad(w, loadOptions{})
			mirrored := b.clients(w, 100, 10)
			checkLoad(t, bg.wait())
			if len(mirrored.failed(nil)) > 0 {
				t.Errorf("mirrored clients: %s", mirrored.describe(nil))
			}
			w.checkMemory(t, mirrorCeiling, healthyRSS)
			n := w.goroutines(t)
			t.Logf("%s: %d goroutines in the waypoint after 100 mirrored connections (+ the background load's)", transport, n)
			if n > mirrorGoroutines {
				t.Errorf("%s: %d goroutines in the waypoint after 100 mirrored connections to a stalled developer app, want at most %d",
					transport, n, mirrorGoroutines)
			}
		})
	}
}

// clients runs n TCP requests (greeting, 64 KiB echoed), conc at a time, from another identity.
func (b *bed) clients(w *waypoint, n, conc int) loadResult {
	l := &load{b: b, o: loadOptions{n: n, deadline: 10 * time.Second}}
	c := &loadClient{id: "spiffe://cluster.local/ns/default/sa/client", b: b}
	c.d = istioDialer(w, b.clientTLS(c.id))
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			r := result{i: i, kind: "tcp", start: time.Now()}
			r.answer, r.err = c.tcpSized(i, 64<<10, l.o.deadline)
			r.end = time.Now()
			l.mu.Lock()
			l.results = append(l.results, r)
			l.mu.Unlock()
		})
	}
	wg.Wait()
	return loadResult{results: l.results}
}

// A developer's CLI killed with SIGKILL (QUIC): the requests its filter matches reach the real
// service (per-request deadline 2 s: the fallback should take about 1 s). Only a request the
// developer's app was answering at the kill may fail: it was handed to the developer and cannot
// be replayed to the service.
func TestDeadDeveloper(t *testing.T) {
	b := newBed(t, bedOptions{})
	w := b.startWaypoint(selfIP)
	dl := it.ListenAt(t, "127.0.0.1:0")
	httpApp(t, dl, "dev")
	cli := b.cli(w, "alice", "quic", "steal", 80, dl.Addr().String(), "--header", "x-dev=alice")
	bg := b.startLoad(w, loadOptions{header: []string{"x-dev", "alice"}, accept: []string{"dev"}, deadline: 2 * time.Second})
	bg.waitEnded(40)
	killed := time.Now()
	cli.Process.Kill()
	<-cli.Done
	res := bg.wait()
	stolen, after, matched, inflight := 0, 0, 0, 0
	for _, r := range res.results {
		if r.matched {
			matched++
		}
		if r.matched && r.answer == "dev" {
			stolen++
		}
		if r.matched && r.start.After(killed) {
			after++
		}
		if r.start.Before(killed) && r.end.After(killed) {
			inflight++
		}
	}
	failedAfter := res.failed(func(r result) bool { return r.start.After(killed) })
	failedInflight := res.failed(func(r result) bool { return !r.start.After(killed) })
	if len(failedAfter) > 0 {
		t.Errorf("%d of %d requests started after the kill failed (%d matched the dead developer's filter); first: #%d %v",
			len(failedAfter), len(res.results)-len(res.failed(func(r result) bool { return !r.start.After(killed) }))-inflight, after, failedAfter[0].i, failedAfter[0].err)
	}
	if len(failedInflight) > inflight {
		t.Errorf("%d requests started before the kill failed, but only %d were in flight at it; first: #%d %v",
			len(failedInflight), inflight, failedInflight[0].i, failedInflight[0].err)
	}
	t.Logf("%d requests, %d matched, %d stolen before the kill, %d in flight at it (%d of those failed), %d started after it (0 failed)",
		len(res.results), matched, stolen, inflight, len(failedInflight), after)
	if stolen == 0 || !strings.Contains(cli.Output(), "stealing") {
		t.Errorf("no request reached the developer before the kill")
	}
}
