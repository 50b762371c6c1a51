// Package sessions tests debug sessions end to end with real processes: the `detour waypoint`
// binary with a static config, `detour steal` / `detour mirror` as the developer's CLI, a backend
// pod behind an HBONE terminator, a developer's local apps, and clients speaking HBONE to the
// waypoint as ztunnel does.
package sessions

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
)

var detourBin string

func TestMain(m *testing.M) { it.MainWithDetour(m, "sessions", &detourBin, nil) }

var quiet = slog.New(slog.DiscardHandler)

const (
	clientID = "spiffe://cluster.local/ns/default/sa/client"
	vip      = "10.96.0.40"
)

// bed is one waypoint process with service web.demo (80 http, 81 grpc, 82 tcp) whose one pod
// (127.0.0.2) answers "real", and a developer's apps on loopback answering "dev".
type bed struct {
	dir      string
	ca       *devca.CA
	hbone    string // the waypoint's HBONE address
	tunnel   string
	client   *hbone.Dialer
	opts     hbone.DialOptions
	devHTTP  string
	devGRPC  string
	devTCP   string
	devSeen  chan []byte // what the developer's TCP app received, per connection
	waypoint *it.Proc
	ns       *testbed.Pod // the network namespace everything runs in; nil: the test's own
}

func newBed(t *testing.T) *bed { return newBedIn(t, nil) }

// newBedIn is newBed with every process, listener and client in network namespace ns (nil: the
// test's own).
func newBedIn(t *testing.T, ns *testbed.Pod) *bed {
	b := &bed{dir: t.TempDir(), devSeen: make(chan []byte, 100), ns: ns}
	var err error
	if b.ca, err = devca.Init(filepath.Join(b.dir, "ca"), "cluster.local"); err != nil {
		t.Fatal(err)
	}
	podID := b.id(t, "spiffe://cluster.local/ns/demo/sa/web")
	// The pod: its apps and its "ztunnel" (detour's HBONE server with a Forwarder).
	appHTTP, appGRPC, appTCP := httpAppIn(t, ns, "127.0.0.2", "real"), grpcAppIn(t, ns, "127.0.0.2", "real"), tcpAppIn(t, ns, "127.0.0.2", "real", nil)
	hl := listen(t, ns, "127.0.0.2:0")
	fwd := &hbone.Forwarder{}
	if ns != nil {
		fwd.Dial = ns.DialContext
	}
	term := &hbone.Server{Handler: fwd, TLSConfig: identity.ServerTLS(podID, nil), Logger: quiet}
	go term.Serve(hl)
	t.Cleanup(func() { term.Close() })
	// The developer's apps.
	b.devHTTP, b.devGRPC, b.devTCP = httpAppIn(t, ns, "127.0.0.1", "dev"), grpcAppIn(t, ns, "127.0.0.1", "dev"), tcpAppIn(t, ns, "127.0.0.1", "dev", b.devSeen)

	b.hbone = freeIn(t, ns)
	port := func(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }
	cfg := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: "spiffe://cluster.local/ns/demo/sa/detour"}}
listeners: {hbone: %q, health: "off", tunnel: "127.0.0.1:0", upstreamHBONEPort: %s}
waypoint: {namespace: demo, gateway: detour}
discovery:
  static:
    services:
    - name: web
      namespace: demo
      vips: [%s]
      ports:
      - {name: http, port: 80, targetPort: %s}
      - {name: grpc, port: 81, targetPort: %s}
      - {name: tcp, port: 82, targetPort: %s}
      endpoints: [{ip: 127.0.0.2, serviceAccount: web}]
    policies:
    - name: developers
      namespace: demo
      spec:
        targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: detour}]
        action: ALLOW
        rules:
        - from: [{source: {principals: ["cluster.local/ns/dev/sa/*"]}}]
          to: [{operation: {methods: [STEAL, MIRROR], hosts: [web.demo.svc.cluster.local]}}]
`, filepath.Join(b.dir, "ca"), b.hbone, port(hl.Addr().String()), vip, port(appHTTP), port(appGRPC), port(appTCP))
	path := filepath.Join(b.dir, "waypoint.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	b.waypoint = startIn(t, ns, detourBin, "waypoint", "--config", path)
	b.tunnel = b.waypoint.Find(t, `tunnel=(127\.0\.0\.1:\d+)`)
	cliTLS, err := identity.ClientTLS(b.id(t, clientID), spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/detour"))
	if err != nil {
		t.Fatal(err)
	}
	b.opts = hbone.DialOptions{TLSConfig: cliTLS, Forwarded: `for="10.244.1.7:40000"`}
	b.client = &hbone.Dialer{Logger: quiet}
	if ns != nil {
		b.client.NetDial = ns.DialContext
	}
	t.Cleanup(func() { b.client.Close() })
	return b
}

func (b *bed) id(t *testing.T, id string) identity.Source {
	svid, err := b.ca.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return identity.Static(&identity.Identity{SVID: svid, Bundle: b.ca.Bundle()})
}

// cli runs `detour MODE svc/web:PORT --to to ...` as developer dev and waits for its first line.
func (b *bed) cli(t *testing.T, dev, transport, mode string, port int, to string, args ...string) *it.Proc {
	argv := append([]string{mode, fmt.Sprintf("svc/web:%d", port), "-n", "demo", "--to", to, "--waypoint", b.tunnel,
		"--transport", transport, "--ca", filepath.Join(b.dir, "ca"), "--id", "spiffe://cluster.local/ns/dev/sa/" + dev}, args...)
	p := startIn(t, b.ns, detourBin, argv...)
	p.WaitFor(t, map[string]string{"steal": "stealing ", "mirror": "mirroring "}[mode])
	return p
}

// start runs bin with args (name is for the reader).
func start(t *testing.T, _ string, bin string, args ...string) *it.Proc {
	return it.Start(t, exec.Command(bin, args...))
}

// startIn runs bin with args in network namespace ns (nil: the test's own).
func startIn(t *testing.T, ns *testbed.Pod, bin string, args ...string) *it.Proc {
	if ns == nil {
		return it.Start(t, exec.Command(bin, args...))
	}
	return it.Start(t, ns.Command(bin, args...))
}

// listen listens on TCP addr in ns (nil: the test's own namespace).
func listen(t *testing.T, ns *testbed.Pod, addr string) net.Listener {
	var l net.Listener
	var err error
	if ns == nil {
		l, err = net.Listen("tcp", addr)
	} else {
		l, err = ns.Listen(addr)
	}
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func free(t *testing.T) string { return freeIn(t, nil) }

func freeIn(t *testing.T, ns *testbed.Pod) string {
	l := listen(t, ns, "127.0.0.1:0")
	defer l.Close()
	return l.Addr().String()
}

// httpApp answers every request with "<name> <proto> <body>" (HTTP/1.1 and HTTP/2 prior knowledge).
func httpApp(t *testing.T, ip, name string) string { return httpAppIn(t, nil, ip, name) }

func httpAppIn(t *testing.T, ns *testbed.Pod, ip, name string) string {
	l := listen(t, ns, ip+":0")
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s %s", name, r.Proto, body)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

type grpcEcho struct {
	testgrpc.UnimplementedTestServiceServer
	name string
}

func (g *grpcEcho) FullDuplexCall(s testgrpc.TestService_FullDuplexCallServer) error {
	for {
		req, err := s.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		body := append([]byte(g.name+" "), req.GetPayload().GetBody()...)
		if err := s.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: body}}); err != nil {
			return err
		}
	}
}

func grpcAppIn(t *testing.T, ns *testbed.Pod, ip, name string) string {
	l := listen(t, ns, ip+":0")
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, &grpcEcho{name: name})
	go gs.Serve(l)
	t.Cleanup(gs.Stop)
	return l.Addr().String()
}

// tcpApp writes "<name>\n" then echoes; seen, if set, gets everything a connection sent.
func tcpAppIn(t *testing.T, ns *testbed.Pod, ip, name string, seen chan<- []byte) string {
	l := listen(t, ns, ip+":0")
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.WriteString(c, name+"\n")
				var got bytes.Buffer
				io.Copy(io.MultiWriter(c, &got), c)
				c.(*net.TCPConn).CloseWrite()
				if seen != nil {
					seen <- got.Bytes()
				}
			}()
		}
	}()
	return l.Addr().String()
}

// httpClient sends requests over HBONE streams to the waypoint; streams counts them.
func (b *bed) httpClient(t *testing.T, h2 bool) (*http.Client, *int) {
	n := new(int)
	var p http.Protocols
	if h2 {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: &p, MaxConnsPerHost: 1, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		*n++
		return b.client.Dial(ctx, b.hbone, addr, b.opts)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}, n
}

func post(c *http.Client, body string, header ...string) (string, error) {
	req, _ := http.NewRequest("POST", "http://"+vip+":80/x", strings.NewReader(body))
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("status %d: %s", resp.StatusCode, got)
	}
	return string(got), err
}

// Acceptance 1: with a header filter, requests carrying the header reach the developer's app and
// the others the real service, on one client connection: HTTP/1.1 keep-alive, HTTP/2, and gRPC
// bidi streams; over both tunnels.
func TestHeaderFilteredSteal(t *testing.T) {
	for _, transport := range []string{"quic", "h2"} {
		t.Run(transport, func(t *testing.T) {
			b := newBed(t)
			cli := b.cli(t, "alice", transport, "steal", 80, b.devHTTP, "--header", "x-dev=alice")
			b.cli(t, "alice", transport, "steal", 81, b.devGRPC, "--header", "x-dev=alice")
			for _, h2 := range []bool{false, true} {
				c, streams := b.httpClient(t, h2)
				proto := map[bool]string{false: "HTTP/1.1", true: "HTTP/2.0"}[h2]
				for i := range 10 {
					var hdr []string
					want := fmt.Sprintf("real %s body-%d", proto, i)
					if i%2 == 1 {
						hdr = []string{"X-Dev", "alice"}
						want = fmt.Sprintf("dev %s body-%d", proto, i)
					}
					got, err := post(c, fmt.Sprint("body-", i), hdr...)
					if err != nil || got != want {
						t.Fatalf("%s request %d: %q %v, want %q", proto, i, got, err, want)
					}
				}
				if *streams != 1 {
					t.Errorf("%s: %d client connections, want 1", proto, *streams)
				}
			}
			checkGRPC(t, b)
			cli.WaitFor(t, "steal POST /x 200")
		})
	}
}

// checkGRPC: on one gRPC connection, calls with x-dev: alice reach the developer, the others the
// real service, each a bidi stream of 5 messages.
func checkGRPC(t *testing.T, b *bed) {
	cc, err := grpc.NewClient("passthrough:///"+vip+":81", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return b.client.Dial(ctx, b.hbone, addr, b.opts)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)
	for call := range 4 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		want := "real"
		if call%2 == 1 {
			ctx = metadata.AppendToOutgoingContext(ctx, "x-dev", "alice")
			want = "dev"
		}
		s, err := client.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 5 {
			msg := []byte(fmt.Sprint("m", call, i))
			if err := s.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: msg}}); err != nil {
				t.Fatal(err)
			}
			resp, err := s.Recv()
			if err != nil || string(resp.GetPayload().GetBody()) != want+" "+string(msg) {
				t.Fatalf("gRPC call %d message %d: %q %v, want %s", call, i, resp.GetPayload().GetBody(), err, want)
			}
		}
		s.CloseSend()
		if _, err := s.Recv(); err != io.EOF {
			t.Fatalf("gRPC call %d end: %v", call, err)
		}
		cancel()
	}
}

// tcpRoundTrip sends msg on a new stream to port 82 and returns what came back.
func (b *bed) tcpRoundTrip(t *testing.T, msg []byte) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := b.client.Dial(ctx, b.hbone, vip+":82", b.opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Write(msg)
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	return string(got)
}

// Acceptance 2: a whole opaque TCP stream is stolen; after Ctrl-C new streams reach the real
// service again. A mirror leaves the real answer untouched while the developer gets a
// byte-identical copy.
func TestWholeStreamStealAndMirror(t *testing.T) {
	b := newBed(t)
	msg := bytes.Repeat([]byte("opaque bytes "), 5000)
	steal := b.cli(t, "alice", "quic", "steal", 82, b.devTCP)
	if got := b.tcpRoundTrip(t, msg); got != "dev\n"+string(msg) {
		t.Fatalf("stolen stream answered %.40q...", got)
	}
	<-b.devSeen
	steal.WaitFor(t, "steal stream: 65000 B in")
	steal.Process.Signal(os.Interrupt)
	<-steal.Done
	if !strings.Contains(steal.Output(), "session ended") {
		t.Errorf("CLI after Ctrl-C:\n%s", steal.Output())
	}
	if got := b.tcpRoundTrip(t, msg); got != "real\n"+string(msg) {
		t.Fatalf("after the session: %.40q...", got)
	}

	b.cli(t, "bob", "h2", "mirror", 82, b.devTCP)
	if got := b.tcpRoundTrip(t, msg); got != "real\n"+string(msg) {
		t.Fatalf("mirrored stream answered %.40q...", got)
	}
	select {
	case copy := <-b.devSeen:
		if !bytes.Equal(copy, msg) {
			t.Fatalf("the developer's copy differs: %d bytes of %d", len(copy), len(msg))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the developer never got the copy")
	}

	// A steal whose local app is down: the CLI cannot connect the stream, says so, and the stream
	// goes to the real service instead of failing.
	b.cli(t, "eve", "h2", "steal", 82, "127.0.0.1:1")
	if got := b.tcpRoundTrip(t, msg); got != "real\n"+string(msg) {
		t.Fatalf("a steal whose app is down answered %.40q...", got)
	}
}

// Acceptance 5: SIGKILL the CLI in the middle of 200 connections/s: no connection the session
// did not match fails, and from 5 s after the kill every connection reaches the real service.
func TestDisconnectUnderLoad(t *testing.T) {
	for _, transport := range []string{"quic", "h2"} {
		t.Run(transport, func(t *testing.T) {
			b := newBed(t)
			cli := b.cli(t, "alice", transport, "steal", 80, b.devHTTP, "--header", "x-dev=alice")
			type result struct {
				at      time.Time
				matched bool
				body    string
				err     error
			}
			var mu sync.Mutex
			var results []result
			var wg sync.WaitGroup
			var killed time.Time
			tick := time.NewTicker(5 * time.Millisecond) // 200 connections/s
			defer tick.Stop()
			begin := time.Now()
			for i := 0; time.Since(begin) < 9*time.Second; i++ {
				<-tick.C
				if killed.IsZero() && time.Since(begin) > 2*time.Second {
					cli.Process.Kill()
					killed = time.Now()
				}
				matched := i%2 == 0
				wg.Go(func() {
					start := time.Now()
					c, _ := b.httpClient(t, false)
					c.Transport.(*http.Transport).DisableKeepAlives = true
					var hdr []string
					if matched {
						hdr = []string{"X-Dev", "alice"}
					}
					body, err := post(c, "x", hdr...)
					mu.Lock()
					results = append(results, result{start, matched, body, err})
					mu.Unlock()
				})
			}
			wg.Wait()
			var unmatchedFail, lateNotReal, before, after int
			for _, r := range results {
				switch {
				case !r.matched && r.err != nil:
					unmatchedFail++
					t.Logf("unmatched connection failed: %v", r.err)
				case r.at.After(killed.Add(5*time.Second)) && (r.err != nil || !strings.HasPrefix(r.body, "real ")):
					lateNotReal++
					t.Logf("5 s after the kill: %q %v", r.body, r.err)
				}
				if r.matched && r.err == nil && strings.HasPrefix(r.body, "dev ") {
					before++
				}
				if r.at.After(killed.Add(5 * time.Second)) {
					after++
				}
			}
			// How long matched connections kept failing or going nowhere after the kill.
			var recovered time.Duration
			for _, r := range results {
				if r.matched && r.at.After(killed) && (r.err != nil || !strings.HasPrefix(r.body, "real ")) {
					recovered = max(recovered, r.at.Sub(killed))
				}
			}
			t.Logf("%s: %d connections, %d stolen before the kill; matched connections reached the real service from %v after the kill",
				transport, len(results), before, recovered.Round(time.Millisecond))
			if unmatchedFail > 0 || lateNotReal > 0 || before == 0 || after < 300 {
				t.Fatalf("%d connections: %d unmatched failed, %d not served by the real service 5 s after the kill, %d stolen before, %d checked after",
					len(results), unmatchedFail, lateNotReal, before, after)
			}
		})
	}
}

// A mirror whose developer stalls loses its copy (counted, and shown by `detour sessions`); the
// real stream is never held back.
func TestStalledMirrorNeverSlowsTheRealPath(t *testing.T) {
	b := newBed(t)
	stalled, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	go func() {
		for {
			c, err := stalled.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accepted, never read
		}
	}()
	b.cli(t, "carol", "quic", "mirror", 82, stalled.Addr().String())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := b.client.Dial(ctx, b.hbone, vip+":82", b.opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const size = 32 << 20
	go func() {
		chunk := bytes.Repeat([]byte("m"), 1<<20)
		for range size / len(chunk) {
			if _, err := s.Write(chunk); err != nil {
				return
			}
		}
		s.CloseWrite()
	}()
	n, err := io.Copy(io.Discard, s)
	if err != nil || n != size+int64(len("real\n")) {
		t.Fatalf("the real echo: %d bytes, %v; want %d", n, err, size+5)
	}
	out := start(t, "sessions", detourBin, "sessions", "--waypoint", b.tunnel, "--ca", filepath.Join(b.dir, "ca"),
		"--id", "spiffe://cluster.local/ns/dev/sa/carol")
	<-out.Done
	lines := strings.Split(strings.TrimSpace(out.Output()), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "SESSION") || !strings.Contains(lines[1], "mirror") ||
		!strings.Contains(lines[1], "spiffe://cluster.local/ns/dev/sa/carol") || strings.HasSuffix(lines[1], " 0") {
		t.Fatalf("detour sessions (want the mirror with a dropped count):\n%s", out.Output())
	}
	t.Logf("detour sessions:\n%s", out.Output())
}

// Acceptance 4 on the wire, and HTTP mirroring: alice and bob steal by different values of one
// header at once, carol mirrors every request with path /copy/...; the rest reach the service.
func TestDevelopersSideBySide(t *testing.T) {
	b := newBed(t)
	alice, bob := httpApp(t, "127.0.0.1", "alice"), httpApp(t, "127.0.0.1", "bob")
	copies := make(chan string, 10)
	carolL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	carol := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		copies <- r.Method + " " + r.URL.Path + " " + r.Header.Get("X-Trace") + " " + string(body)
		io.WriteString(w, "carol's answer, discarded")
	})}
	go carol.Serve(carolL)
	defer carol.Close()
	b.cli(t, "alice", "quic", "steal", 80, alice, "--header", "x-dev=alice")
	b.cli(t, "bob", "h2", "steal", 80, bob, "--header", "x-dev=bob")
	b.cli(t, "carol", "quic", "mirror", 80, carolL.Addr().String(), "--path", "^/copy/")
	refused := start(t, "cli-dave", detourBin, "steal", "svc/web:80", "-n", "demo", "--to", alice, "--waypoint", b.tunnel,
		"--header", "x-dev~.*", "--ca", filepath.Join(b.dir, "ca"), "--id", "spiffe://cluster.local/ns/dev/sa/dave")
	<-refused.Done
	if refused.ProcessState.ExitCode() != 1 || !strings.Contains(refused.Output(), "already stolen by spiffe://cluster.local/ns/dev/sa/") {
		t.Fatalf("an overlapping steal: exit %d\n%s", refused.ProcessState.ExitCode(), refused.Output())
	}
	c, _ := b.httpClient(t, false)
	for _, tc := range []struct {
		dev, want string
	}{{"alice", "alice HTTP/1.1 x"}, {"bob", "bob HTTP/1.1 x"}, {"", "real HTTP/1.1 x"}, {"mallory", "real HTTP/1.1 x"}} {
		var hdr []string
		if tc.dev != "" {
			hdr = []string{"X-Dev", tc.dev}
		}
		if got, err := post(c, "x", hdr...); err != nil || got != tc.want {
			t.Errorf("x-dev=%q: %q %v, want %q", tc.dev, got, err, tc.want)
		}
	}
	req, _ := http.NewRequest("POST", "http://"+vip+":80/copy/me", strings.NewReader("mirrored body"))
	req.Header.Set("X-Trace", "t-1")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(got) != "real HTTP/1.1 mirrored body" {
		t.Fatalf("the mirrored request's real answer: %q", got)
	}
	select {
	case cp := <-copies:
		if cp != "POST /copy/me t-1 mirrored body" {
			t.Fatalf("carol's copy: %q", cp)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("carol never got her copy")
	}
	select {
	case cp := <-copies:
		t.Fatalf("carol got a request outside her filter: %q", cp)
	case <-time.After(200 * time.Millisecond):
	}
}
