// Package fault attacks the real `detour waypoint` process as a security reviewer would, each
// attack alongside a bounded background load of ordinary HTTP and TCP requests from other
// identities, and asserts on counts: no failed request of another client (or exactly the ones in
// flight through a killed process), and a ceiling on the waypoint's memory. Everything runs on
// loopback: the waypoint on 127.0.0.1, two pods on 127.0.0.2 and 127.0.0.3, each behind Istio's
// own Go HBONE server run as a process (testbed's podproc), so that a pod can be killed.
package fault

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
)

var detourBin string

func TestMain(m *testing.M) {
	it.MainWithDetour(m, "fault", &detourBin, func() error { it.QuietIstio(); return nil })
}

// The mesh the waypoint serves (static discovery).
const (
	trustDomain = "cluster.local"
	waypointID  = "spiffe://cluster.local/ns/demo/sa/detour"
	podID       = "spiffe://cluster.local/ns/demo/sa/web"
	webVIP      = "10.96.0.40" // web.demo: 80 http, 82 tcp, on both pods
	ipbVIP      = "10.96.0.41" // ipb.demo: 82 tcp; only ipBlocks 10.244.0.0/16 may connect
	selfVIP     = "10.96.0.42" // detour.demo: the waypoint's own Service, its pod 127.0.0.1
	selfIP      = "127.0.0.1"
)

var podIPs = []string{"127.0.0.2", "127.0.0.3"}

// bed is a waypoint process (or two replicas) with two pods behind HBONE terminators.
type bed struct {
	t        *testing.T
	dir      string
	ca       *devca.CA
	port     int // the HBONE port of the waypoints and of the pods' terminators
	httpPort int // web's pods: HTTP (answers "<pod> <path>")
	tcpPort  int // web's pods: TCP (writes "<pod>\n", then echoes)
	pods     []*pod
	files    bool // the waypoint's identity comes from PEM files (rotation), else from the dev CA
	// dials tracks goroutines of Istio's dialer, which ignores its context: they end when the
	// waypoint dies, so they are waited for last, after every process is gone.
	dials sync.WaitGroup
}

// pod is one endpoint of web: its apps in this process, its terminator a process.
type pod struct {
	name, ip string
	term     *it.Proc
}

type bedOptions struct {
	// filesIdentity: the waypoint reads its SVID from files (polled), for certificate rotation.
	filesIdentity bool
}

func newBed(t *testing.T, o bedOptions) *bed {
	b := &bed{t: t, dir: t.TempDir(), files: o.filesIdentity}
	t.Cleanup(b.dials.Wait) // registered first, so it runs after every process was stopped
	var err error
	if b.ca, err = devca.Init(filepath.Join(b.dir, "ca"), trustDomain); err != nil {
		t.Fatal(err)
	}
	b.port = it.FreePort(t, append([]string{selfIP, "127.0.0.4"}, podIPs...)...)
	hl, tl := it.ListenSamePort(t, podIPs), it.ListenSamePort(t, podIPs)
	b.httpPort, b.tcpPort = hl[0].Addr().(*net.TCPAddr).Port, tl[0].Addr().(*net.TCPAddr).Port
	for i, ip := range podIPs {
		p := &pod{name: fmt.Sprintf("pod%d", i+2), ip: ip}
		b.pods = append(b.pods, p)
		httpApp(t, hl[i], p.name)
		it.BackendOn(t, tl[i], func(c *net.TCPConn) {
			io.WriteString(c, p.name+"\n")
			io.Copy(c, c)
			c.CloseWrite()
		})
		b.startTerminator(p)
	}
	if b.files {
		b.rotate() // the first SVID
	}
	return b
}

// startTerminator runs Istio's Go HBONE server for the pod (its "ztunnel" inbound) with the
// pod's identity; it dials the targets it is given, the pod's apps.
func (b *bed) startTerminator(p *pod) {
	bin, err := testbed.PodProc()
	if err != nil {
		b.t.Fatal(err)
	}
	prefix := filepath.Join(b.dir, p.name)
	if err := b.ca.WriteSVID(b.svid(podID), prefix); err != nil {
		b.t.Fatal(err)
	}
	addr := net.JoinHostPort(p.ip, strconv.Itoa(b.port))
	p.term = it.Start(b.t, exec.Command(bin, "istio-hbone", addr, prefix+".crt", prefix+".key", prefix+".bundle.pem"))
	waitListening(b.t, addr, p.term)
}

func (b *bed) svid(id string) *x509svid.SVID {
	s, err := b.ca.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		b.t.Fatal(err)
	}
	return s
}

// source is a static identity source for id, for the test's own clients.
func (b *bed) source(id string) identity.Source {
	return identity.Static(&identity.Identity{SVID: b.svid(id), Bundle: b.ca.Bundle()})
}

// rotate writes a new SVID (new key) for the waypoint to the files it polls.
func (b *bed) rotate() {
	if err := b.ca.WriteSVID(b.svid(waypointID), filepath.Join(b.dir, "waypoint")); err != nil {
		b.t.Fatal(err)
	}
}

// waypoint is one `detour waypoint` process.
type waypoint struct {
	b      *bed
	ip     string
	config string
	proc   *it.Proc
	hbone  string // address
	tunnel string // address (QUIC and HTTP/2)
	health string // address: /metrics
	mem    *memWatch
}

// startWaypoint runs a waypoint listening on ip (127.0.0.1, or 127.0.0.4 for a second replica).
func (b *bed) startWaypoint(ip string) *waypoint {
	w := &waypoint{b: b, ip: ip, config: filepath.Join(b.dir, "waypoint-"+ip+".yaml")}
	if err := os.WriteFile(w.config, []byte(b.config(ip)), 0o600); err != nil {
		b.t.Fatal(err)
	}
	w.start()
	return w
}

func (w *waypoint) start() {
	cmd := exec.Command(detourBin, "waypoint", "--config", w.config)
	cmd.Env = append(os.Environ(), "GOTRACEBACK=all") // SIGQUIT dumps every goroutine: see goroutines
	w.proc = it.Start(w.b.t, cmd)
	w.hbone = w.proc.Find(w.b.t, `msg="waypoint serving" hbone=(\S+)`)
	w.health = w.proc.Find(w.b.t, `msg="waypoint serving" .* health=(\S+)`)
	w.tunnel = w.proc.Find(w.b.t, `msg="waypoint serving" .* tunnel=(\S+)`)
	w.mem = watchMemory(w.b.t, w.proc, memKillAt)
}

// kill sends SIGKILL and waits until the process is gone (its sockets closed).
func (w *waypoint) kill() {
	w.proc.Process.Kill()
	<-w.proc.Done
	w.mem.stop()
}

func (b *bed) config(ip string) string {
	id := fmt.Sprintf(`{source: devca, devca: {dir: %q, id: %q}}`, filepath.Join(b.dir, "ca"), waypointID)
	if b.files {
		p := filepath.Join(b.dir, "waypoint")
		id = fmt.Sprintf(`{source: files, files: {cert: %q, key: %q, bundle: %q}}`, p+".crt", p+".key", p+".bundle.pem")
	}
	eps := fmt.Sprintf(`[{ip: %s, serviceAccount: web}, {ip: %s, serviceAccount: web}]`, podIPs[0], podIPs[1])
	return fmt.Sprintf(`identity: %s
listeners: {hbone: "%s:%d", health: "127.0.0.1:0", tunnel: "127.0.0.1:0", upstreamHBONEPort: %d}
waypoint: {namespace: demo, gateway: detour}
discovery:
  static:
    services:
    - name: web
      namespace: demo
      vips: [%s]
      ports:
      - {name: http, port: 80, targetPort: %d}
      - {name: tcp, port: 82, targetPort: %d}
      endpoints: %s
    - name: ipb
      namespace: demo
      vips: [%s]
      ports: [{name: tcp, port: 82, targetPort: %d}]
      endpoints: %s
    - name: detour
      namespace: demo
      vips: [%s]
      ports: [{name: tcp, port: 82, targetPort: %d}]
      endpoints: [{ip: %s, serviceAccount: detour}]
    policies:
    - name: developers
      namespace: demo
      spec:
        targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: detour}]
        action: ALLOW
        rules:
        - from: [{source: {principals: ["cluster.local/ns/dev/sa/*"]}}]
          to: [{operation: {methods: [STEAL, MIRROR], hosts: [web.demo.svc.cluster.local]}}]
    - name: pods-only
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: ipb}]
        action: ALLOW
        rules:
        - from: [{source: {ipBlocks: [10.244.0.0/16]}}]
`, id, ip, b.port, b.port, webVIP, b.httpPort, b.tcpPort, eps, ipbVIP, b.tcpPort, eps, selfVIP, b.tcpPort, selfIP)
}

// cli runs `detour MODE svc/web:PORT --to to` as developer dev over transport and waits until the
// session is up.
func (b *bed) cli(w *waypoint, dev, transport, mode string, port int, to string, args ...string) *it.Proc {
	argv := append([]string{mode, fmt.Sprintf("svc/web:%d", port), "-n", "demo", "--to", to, "--waypoint", w.tunnel,
		"--transport", transport, "--ca", filepath.Join(b.dir, "ca"), "--id", "spiffe://cluster.local/ns/dev/sa/" + dev}, args...)
	p := it.Start(b.t, exec.Command(detourBin, argv...))
	p.WaitFor(b.t, map[string]string{"steal": "stealing ", "mirror": "mirroring "}[mode])
	return p
}

// httpApp answers every request on l with "<name> <path>".
func httpApp(t *testing.T, l net.Listener, name string) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s %s", name, r.URL.Path)
	}), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() { srv.Serve(l); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
}

// waitListening waits until addr accepts connections, or p exits.
func waitListening(t *testing.T, addr string, p *it.Proc) {
	for range 400 {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-p.Done:
			t.Fatalf("%s exited before listening on %s:\n%s", p.Args[0], addr, p.Output())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("nothing listening on %s after 20 s:\n%s", addr, p.Output())
}

// Memory of a process, from /proc/PID/status.

// memKillAt is where the watch kills a waypoint whose memory runs away (a loop, a flood), so that
// a failing test never takes the shared machine down with it.
const memKillAt = 400 << 20

// memWatch samples a process's VmRSS every 20 ms, keeping the peak, and kills it past a limit.
type memWatch struct {
	p      *it.Proc
	limit  int64
	done   chan struct{}
	exited chan struct{}
	mu     sync.Mutex
	peak   int64
	killed bool
}

func watchMemory(t *testing.T, p *it.Proc, limit int64) *memWatch {
	m := &memWatch{p: p, limit: limit, done: make(chan struct{}), exited: make(chan struct{})}
	go m.run()
	t.Cleanup(m.stop)
	return m
}

func (m *memWatch) run() {
	defer close(m.exited)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		rss, err := procStatus(m.p.Process.Pid, "VmRSS")
		if err == nil {
			m.mu.Lock()
			m.peak = max(m.peak, rss)
			over := rss > m.limit && !m.killed
			if over {
				m.killed = true
			}
			m.mu.Unlock()
			if over {
				m.p.Process.Kill()
			}
		}
		select {
		case <-m.done:
			return
		case <-m.p.Done:
			return
		case <-tick.C:
		}
	}
}

func (m *memWatch) stop() {
	select {
	case <-m.done:
	default:
		close(m.done)
	}
	<-m.exited
}

// Peak is the highest resident set seen: the kernel's VmHWM while the process lives, else the
// highest sample. killed says the watch killed it for passing its limit.
func (m *memWatch) Peak() (peak int64, killed bool) {
	hwm, err := procStatus(m.p.Process.Pid, "VmHWM")
	m.mu.Lock()
	defer m.mu.Unlock()
	if err == nil {
		m.peak = max(m.peak, hwm)
	}
	return m.peak, m.killed
}

// checkMemory fails the test when the waypoint's peak resident set passed ceiling; healthy is the
// value measured without the attack, for the message.
func (w *waypoint) checkMemory(t *testing.T, ceiling, healthy int64) {
	t.Helper()
	peak, killed := w.mem.Peak()
	t.Logf("waypoint peak RSS %d MB (ceiling %d MB; healthy %d MB)", peak>>20, ceiling>>20, healthy>>20)
	switch {
	case killed:
		t.Errorf("waypoint RSS passed %d MB: killed (ceiling %d MB, healthy %d MB)", memKillAt>>20, ceiling>>20, healthy>>20)
	case peak > ceiling:
		t.Errorf("waypoint peak RSS %d MB, over the ceiling of %d MB (healthy %d MB)", peak>>20, ceiling>>20, healthy>>20)
	}
}

// procStatus reads a "kB" field of /proc/PID/status, in bytes.
func procStatus(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

var goroutineHeader = regexp.MustCompile(`(?m)^goroutine [1-9]\d* `) // goroutine 0 is a thread's system stack

// goroutines ends the waypoint with SIGQUIT and counts the goroutines of its dump (GOTRACEBACK=all).
// detour has no debug endpoint; this is the count at the moment of the signal. FAULT_DUMP=FILE
// keeps the dump, to see where they are parked.
func (w *waypoint) goroutines(t *testing.T) int {
	t.Helper()
	before := len(w.proc.Output())
	w.proc.Process.Signal(syscall.SIGQUIT)
	<-w.proc.Done
	w.mem.stop()
	dump := w.proc.Output()[before:]
	if f := os.Getenv("FAULT_DUMP"); f != "" {
		os.WriteFile(f, []byte(dump), 0o644)
	}
	n := len(goroutineHeader.FindAllString(dump, -1))
	if n == 0 {
		t.Fatalf("no goroutine dump after SIGQUIT:\n%s", dump)
	}
	return n
}

// clientTLS is what a mesh client with identity id presents to the waypoint.
func (b *bed) clientTLS(id string) *tls.Config {
	cfg, err := identity.ClientTLS(b.source(id), spiffeid.RequireFromString(waypointID))
	if err != nil {
		b.t.Fatal(err)
	}
	return cfg
}
