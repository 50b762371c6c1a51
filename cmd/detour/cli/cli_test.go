package cli

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Run(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestDemo(t *testing.T) {
	code, out, errOut := run(t, "demo", "--streams", "3", "--duration", "1500ms")
	for _, want := range []string{
		"AuthorizationPolicy demo/only-default: ALLOW from namespace default\n",
		"/metrics (health: /healthz, /readyz)\n",
		"AuthorizationPolicy demo/no-admin: DENY paths /admin*\n",
		"spiffe://cluster.local/ns/untrusted/sa/curl -> GET echo/: 403 RBAC: access denied (AuthorizationPolicy denial, as expected)\n",
		"spiffe://cluster.local/ns/default/sa/sleep -> GET echo/admin/users: 403 RBAC: access denied (AuthorizationPolicy denial, as expected)\n",
		// The steal: alice's requests answered by her laptop, the others by the pods, and the
		// lines detour steal prints.
		"  [detour steal] stealing demo/echo port 80 (header x-dev=alice) -> 127.0.0.1:",
		"  [detour steal] steal GET /cart 200 ",
		"  [detour steal] steal GET /checkout 200 ",
		" from cluster.local/ns/default/sa/sleep\n",
		"spiffe://cluster.local/ns/default/sa/sleep -> GET echo/cart (x-dev: alice): 200 \"hello from alice's laptop\" (stolen: alice's laptop answered)\n",
		"spiffe://cluster.local/ns/default/sa/sleep -> GET echo/cart: 200 from pod 10.244.0.",
		"  [detour steal] session ended\n",
		// The mirror: the pods answer, the laptop gets copies.
		"  [detour mirror] mirroring demo/echo port 80 (header x-dev=alice) -> 127.0.0.1:",
		"spiffe://cluster.local/ns/default/sa/sleep -> POST echo/orders (x-dev: alice): 200 from pod 10.244.0.",
		"alice's laptop app got a copy: POST /orders (x-dev: alice) {\"item\":\"book\"}\n",
		"alice's laptop app got a copy: POST /orders (x-dev: alice) {\"item\":\"pen\"}\n",
		"  [detour mirror] mirror POST /orders 200 ",
		"  [detour mirror] session ended\n",
		"failed 0, p50 ",
		"pod 10.244.0.2:",
		"pod 10.244.0.3:",
		" HBONE streams, every echo byte-exact, 2 denied by policy\n",
		"waypoint metrics: istio_requests_total by response_code: 200=",
		" 403=2; detour_authz_decisions_total: allow=",
	} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("exit %d, missing %q\nstdout:\n%s\nstderr:\n%s", code, want, out, errOut)
		}
	}
	if strings.Contains(out, "127.0.0.2") || strings.Contains(out, ":8080") {
		t.Errorf("the demo binds a fixed address:\n%s", out)
	}
}

// detour demo --duration 0 runs until Ctrl-C (the signal cancels Run's context), then shows its
// summary and metrics and exits 0.
func TestDemoUntilCtrlC(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errOut syncBuffer
	done := make(chan int, 1)
	go func() { done <- Run(ctx, []string{"demo", "--streams", "2", "--duration", "0"}, &out, &errOut) }()
	deadline := time.After(60 * time.Second)
	for !strings.Contains(out.String(), "s] requests ok ") {
		select {
		case code := <-done:
			t.Fatalf("exited (%d) before Ctrl-C:\n%s\n%s", code, out.String(), errOut.String())
		case <-deadline:
			t.Fatalf("no load line:\n%s", out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	cancel() // Ctrl-C
	select {
	case code := <-done:
		for _, want := range []string{" until Ctrl-C\n", "interrupted (Ctrl-C): stopping\n", "waypoint metrics: istio_requests_total by response_code: 200="} {
			if code != 0 || !strings.Contains(out.String(), want) {
				t.Fatalf("exit %d, missing %q\nstdout:\n%s\nstderr:\n%s", code, want, out.String(), errOut.String())
			}
		}
	case <-time.After(30 * time.Second):
		t.Fatal("still running 30 s after Ctrl-C")
	}
}

func TestBadInput(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"demo", "--streams", "0"}, "detour: --streams must be 1..1000, got 0\n"},
		{[]string{"demo", "--duration", "-1s"}, "detour: --duration must be 0 (until Ctrl-C) or positive, got -1s\n"},
		{[]string{"waypoint"}, "detour: --config is required\n"},
		{[]string{"waypoint", "--config", "/nonexistent.yaml"}, "detour: config: open /nonexistent.yaml: no such file or directory\n"},
		{[]string{"hbone-serve"}, "detour: --cert, --key and --ca are required\n"},
		{[]string{"hbone-serve", "--cert", "/nonexistent", "--key", "/nonexistent", "--ca", "x"}, "detour: loading --cert/--key: open /nonexistent: no such file or directory\n"},
		{[]string{"nope"}, "detour: unknown command \"nope\" for \"detour\"\n"},
	} {
		code, _, errOut := run(t, tc.args...)
		if code != 1 || errOut != tc.want {
			t.Errorf("%v: exit %d, stderr %q; want 1, %q", tc.args, code, errOut, tc.want)
		}
	}
}

func TestCA(t *testing.T) {
	dir := t.TempDir()
	if code, out, errOut := run(t, "ca", "init", "--dir", dir+"/ca", "--trust-domain", "example.org"); code != 0 || out != "dev CA for trust domain example.org in "+dir+"/ca\n" {
		t.Fatalf("init: %d %q %q", code, out, errOut)
	}
	if code, _, errOut := run(t, "ca", "init", "--dir", dir+"/ca"); code != 1 || !strings.Contains(errOut, "already holds a CA") {
		t.Fatalf("second init: %d %q", code, errOut)
	}
	code, out, errOut := run(t, "ca", "issue", "--dir", dir+"/ca", "--id", "spiffe://example.org/ns/a/sa/b", "--out", dir+"/b")
	if code != 0 || !strings.HasPrefix(out, "spiffe://example.org/ns/a/sa/b valid until ") {
		t.Fatalf("issue: %d %q %q", code, out, errOut)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ca", "issue", "--dir", dir + "/ca", "--id", "spiffe://other.org/ns/a/sa/b", "--out", dir + "/x"}, "detour: devca: spiffe://other.org/ns/a/sa/b is not in trust domain example.org\n"},
		{[]string{"ca", "issue", "--dir", dir + "/nope", "--id", "spiffe://example.org/a", "--out", dir + "/x"}, "detour: devca: no CA in " + dir + "/nope (run detour ca init): open " + dir + "/nope/ca.crt: no such file or directory\n"},
		{[]string{"ca", "issue", "--dir", dir + "/ca", "--id", "not-an-id", "--out", dir + "/x"}, "detour: devca: SPIFFE ID \"not-an-id\": scheme is missing or invalid\n"},
		{[]string{"ca", "issue", "--dir", dir + "/ca"}, "detour: --dir, --id and --out are required\n"},
	} {
		code, _, errOut := run(t, tc.args...)
		if code != 1 || errOut != tc.want {
			t.Errorf("%v: %d %q, want %q", tc.args, code, errOut, tc.want)
		}
	}
}

// `detour waypoint --config FILE` serves HBONE and /readyz, and exits 0 when cancelled, after
// draining: once cancelled (SIGTERM) /readyz is 503 "draining" while the HBONE listener still
// accepts, for the drain period (--drain-period over the document's).
func TestWaypointCommand(t *testing.T) {
	dir := t.TempDir()
	if code, _, errOut := run(t, "ca", "init", "--dir", dir+"/ca"); code != 0 {
		t.Fatal(errOut)
	}
	free := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}
	hboneAddr, health := free(), free()
	cfg := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: "spiffe://cluster.local/ns/demo/sa/detour"}}
listeners: {hbone: %q, health: %q, tunnel: "127.0.0.1:0"}
waypoint: {namespace: demo}
discovery: {static: {services: []}}
`, dir+"/ca", hboneAddr, health)
	path := dir + "/detour.yaml"
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var out, errOut bytes.Buffer
	go func() {
		done <- Run(ctx, []string{"waypoint", "--config", path, "--drain-period", "10s", "--drain-timeout", "1s"}, &out, &errOut)
	}()
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
			cancel()
			t.Fatalf("never ready: %v\n%s", err, errOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if c, err := net.Dial("tcp", hboneAddr); err != nil {
		t.Fatalf("HBONE listener: %v", err)
	} else {
		c.Close()
	}
	cancel()
	for {
		resp, err := http.Get("http://" + health + "/readyz")
		if err != nil {
			t.Fatalf("/readyz while draining: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 503 && strings.TrimSpace(string(body)) == "draining" {
			break
		}
		if resp.StatusCode != 200 {
			t.Fatalf("/readyz while draining: %d %q", resp.StatusCode, body)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if c, err := net.Dial("tcp", hboneAddr); err != nil {
		t.Fatalf("HBONE listener while draining: %v", err)
	} else {
		c.Close()
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errOut.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("did not exit after the drain")
	}
}

// A port in use at start ends `detour waypoint` at once, with one line naming the listener and
// what to do, whichever listener it is (the tunnel's TCP or UDP half included); nothing is left
// listening.
func TestWaypointPortTaken(t *testing.T) {
	dir := t.TempDir()
	if code, _, errOut := run(t, "ca", "init", "--dir", dir+"/ca"); code != 0 {
		t.Fatal(errOut)
	}
	for _, tc := range []struct {
		listener, network, field string
		want                     string
	}{
		{"hbone", "tcp", "hbone", "(hbone): address already in use; free the port, or set listeners.hbone in the config (another address)"},
		{"health", "tcp", "health", `(health): address already in use; free the port, or set listeners.health in the config (another address, or "off")`},
		{"tunnel", "tcp", "tunnel", `(tunnel, TCP): address already in use; free the port, or set listeners.tunnel in the config (another address, or "off")`},
		{"tunnel", "udp", "tunnel", `(tunnel, UDP): address already in use; free the port, or set listeners.tunnel in the config (another address, or "off")`},
	} {
		t.Run(tc.listener+"-"+tc.network, func(t *testing.T) {
			addrs := map[string]string{}
			for _, name := range []string{"hbone", "health", "tunnel"} {
				addrs[name] = freeTCPUDP(t)
			}
			taken := addrs[tc.field]
			if tc.network == "tcp" {
				l, err := net.Listen("tcp", taken)
				if err != nil {
					t.Fatal(err)
				}
				defer l.Close()
			} else {
				pc, err := net.ListenPacket("udp", taken)
				if err != nil {
					t.Fatal(err)
				}
				defer pc.Close()
			}
			cfg := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: "spiffe://cluster.local/ns/demo/sa/detour"}}
listeners: {hbone: %q, health: %q, tunnel: %q}
waypoint: {namespace: demo}
discovery: {static: {services: []}}
`, dir+"/ca", addrs["hbone"], addrs["health"], addrs["tunnel"])
			code, errOut, exited := runWaypointUntil(t, cfg, 10*time.Second)
			if !exited {
				t.Fatalf("port %s taken: still running 10 s after the start (stderr %q)", taken, errOut)
			}
			want := "detour: listening on " + taken + " " + tc.want + "\n"
			if code != 1 || errOut != want {
				t.Fatalf("exit %d, stderr %q; want 1, %q", code, errOut, want)
			}
			for name, addr := range addrs {
				if addr == taken {
					continue
				}
				if l, err := net.Listen("tcp", addr); err != nil {
					t.Errorf("%s %s still bound after the exit: %v", name, addr, err)
				} else {
					l.Close()
				}
			}
		})
	}
}

// A waypoint whose identity never comes exits once the wait for it ends, with its listeners
// released and its identity watch stopped (was: alive forever, waiting for goroutines nothing
// cancelled).
func TestWaypointWithoutIdentityExits(t *testing.T) {
	defer func(d time.Duration) { identityTimeout = d }(identityTimeout)
	identityTimeout = 500 * time.Millisecond
	hb, health := freeTCPUDP(t), freeTCPUDP(t)
	cfg := fmt.Sprintf(`identity: {source: workload-api, workloadAPI: {addr: "unix://%s/nobody.sock"}}
listeners: {hbone: %q, health: %q, tunnel: "off"}
waypoint: {namespace: demo}
discovery: {static: {services: []}}
`, t.TempDir(), hb, health)
	code, errOut, exited := runWaypointUntil(t, cfg, 20*time.Second)
	if !exited {
		t.Fatalf("still running 20 s after its identity wait ended (stderr %q)", errOut)
	}
	if want := "\ndetour: waypoint: no identity from workload-api: identity: waiting for the first identity: context deadline exceeded\n"; code != 1 || !strings.HasSuffix(errOut, want) {
		t.Fatalf("exit %d, stderr %q; want 1, ending %q", code, errOut, want)
	}
	for _, addr := range []string{hb, health} {
		if l, err := net.Listen("tcp", addr); err != nil {
			t.Errorf("%s still bound after the exit: %v", addr, err)
		} else {
			l.Close()
		}
	}
}

// runWaypointUntil runs `detour waypoint` on the config document cfg and waits at most limit for
// it to exit; past it the waypoint is stopped and exited is false.
func runWaypointUntil(t *testing.T, cfg string, limit time.Duration) (code int, stderr string, exited bool) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "detour.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errOut syncBuffer
	done := make(chan int, 1)
	go func() {
		done <- Run(ctx, []string{"waypoint", "--config", path, "--drain-period", "10s", "--drain-timeout", "1s"}, &out, &errOut)
	}()
	select {
	case code = <-done:
		return code, errOut.String(), true
	case <-time.After(limit):
		cancel()
		<-done
		return 0, errOut.String(), false
	}
}

// syncBuffer is a bytes.Buffer that a running command writes while a test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// freeTCPUDP is a loopback address whose port was free on TCP and UDP a moment ago.
func freeTCPUDP(t *testing.T) string {
	t.Helper()
	l, pc, err := listenTCPUDP("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	defer pc.Close()
	return l.Addr().String()
}

var update = flag.Bool("update", false, "rewrite golden files")

// manifests/base is what `detour install -n default` applies.
func TestManifestsBase(t *testing.T) {
	code, out, errOut := run(t, "install", "-n", "default", "--print")
	if code != 0 {
		t.Fatal(errOut)
	}
	path := "../../../manifests/base/detour.yaml"
	if *update {
		if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(want) != out {
		t.Fatalf("manifests/base/detour.yaml is stale: go test ./cmd/detour/cli -run Manifests -update")
	}
}
