package waypoint_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// l4Bed is the pod bed (podBed) with ports 5432 (declared tcp), 443 (declared tls) and 9000
// (undeclared, sniffed), and the waypoint with the given TCPRoutes and TLSRoutes. The pods'
// apps write their name and a newline, then echo every byte until EOF; on 443 they do so inside
// TLS. The waypoint draws weights with a counter: 0, 1, 2, ...
type l4Bed struct {
	*podBed
	draws atomic.Int64
	late  time.Duration // how long exchange's client pauses after the 200 before it speaks
}

func newL4Bed(t *testing.T, tweak func(*waypoint.Handler), routes ...string) *l4Bed {
	b := &l4Bed{}
	tcpPort, tlsPort := freePort(t), freePort(t)
	cert := selfSigned(t)
	apps := func(ip, sa string) {
		for _, port := range []int{tcpPort, tlsPort} {
			l := listen(t, ip, port)
			if port == tlsPort {
				l = tls.NewListener(l, &tls.Config{Certificates: []tls.Certificate{cert}})
			}
			go serveBannerEcho(l, sa)
			t.Cleanup(func() { l.Close() })
		}
	}
	ports := []route.Port{{Name: "tcp", Port: 5432, TargetPort: uint16(tcpPort)}, {Name: "tls", Port: 443, TargetPort: uint16(tlsPort)},
		{Name: "data", Port: 9000, TargetPort: uint16(tcpPort)}}
	b.podBed = newPodBed(t, ports, apps, func(h *waypoint.Handler, table *route.Table) {
		tlss, tcps := kinds(routes, "TLSRoute")
		rt, err := l4route.Compile(table, "demo", decodeAll(t, tcps, l4route.DecodeTCPRoute), decodeAll(t, tlss, l4route.DecodeTLSRoute))
		if err != nil {
			t.Fatal(err)
		}
		h.L4Routes = func() *l4route.Table { return rt }
		h.SniffWait = clientFirstWait // every exchange writes first, then half-closes
		h.RouteRand = func(n int) int { return int(b.draws.Add(1)-1) % n }
		if tweak != nil {
			tweak(h)
		}
	})
	return b
}

// serveBannerEcho answers each connection with bannerEcho.
func serveBannerEcho(l net.Listener, pod string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			bannerEcho(c, pod)
		}()
	}
}

// bannerEcho writes pod's name and a newline to c, then echoes it until EOF.
func bannerEcho(c net.Conn, pod string) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, pod+"\n"); err != nil {
		return
	}
	io.Copy(c, c)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "echo"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"*.example.com", "example.com"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// exchange opens target through the waypoint (inside TLS with that SNI when sni is not ""),
// sends payload, half-closes, and returns the pod that answered; the echo must be payload,
// byte for byte.
func (b *l4Bed) exchange(t *testing.T, target, sni string, payload []byte) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := b.client.Dial(ctx, b.waypoint, target, b.opts)
	if err != nil {
		return "", err
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(10 * time.Second))
	time.Sleep(b.late)
	var c interface {
		net.Conn
		CloseWrite() error
	} = s
	if sni != "" {
		tc := tls.Client(s, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
		if err := tc.HandshakeContext(ctx); err != nil {
			return "", fmt.Errorf("handshake: %w", err)
		}
		c = tc
	}
	// The client writes first: a sniffed port sees its bytes, not the app's banner.
	done := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		done <- errors.Join(err, c.CloseWrite())
	}()
	r := bufio.NewReader(c)
	pod, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading the banner: %w", err)
	}
	echo, err := io.ReadAll(r)
	if werr := <-done; werr != nil {
		return "", fmt.Errorf("writing: %w", werr)
	}
	if err != nil {
		return "", fmt.Errorf("reading the echo: %w", err)
	}
	if !bytes.Equal(echo, payload) {
		return "", fmt.Errorf("echo of %d bytes differs from the %d sent", len(echo), len(payload))
	}
	return strings.TrimSuffix(pod, "\n"), nil
}

// spread opens n connections to target (inside TLS with SNI sni when not ""), the i-th sending
// size+i bytes, and counts the pods that answered.
func (b *l4Bed) spread(t *testing.T, target, sni string, n, size int) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for i := range n {
		pod, err := b.exchange(t, target, sni, payload(t, size+i))
		if err != nil {
			t.Fatalf("%s (SNI %q): connection %d: %v", target, sni, i, err)
		}
		counts[pod]++
	}
	return counts
}

func payload(t *testing.T, n int) []byte {
	p := make([]byte, n)
	if _, err := rand.Read(p); err != nil {
		t.Fatal(err)
	}
	return p
}

const tcpSplit = `
kind: TCPRoute
metadata: {name: split, namespace: demo}
spec:
  parentRefs: [{name: echo}]
  rules: [{backendRefs: [{name: echo-v1, port: 5432, weight: 3}, {name: echo-v2, port: 5432, weight: 1}]}]
`

// A TCPRoute splits connections by weight, each one drawn once and carried byte for byte, on a
// declared tcp port (decided at CONNECT) and on an undeclared one (decided once sniffed).
func TestTCPRouteWeights(t *testing.T) {
	b := newL4Bed(t, nil, tcpSplit)
	for _, target := range []string{"10.96.0.30:5432", "10.96.0.30:9000"} {
		if counts := b.spread(t, target, "", 20, 64<<10); counts["echo-v1"] != 15 || counts["echo-v2"] != 5 {
			t.Errorf("%s: 20 connections over weights 3:1 went %v, want echo-v1 15, echo-v2 5", target, counts)
		}
	}
	// A large stream stays whole.
	if _, err := b.exchange(t, "10.96.0.30:5432", "", payload(t, 4<<20)); err != nil {
		t.Errorf("4 MiB: %v", err)
	}
}

const tlsExact = `
kind: TLSRoute
metadata: {name: exact, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 443}]
  hostnames: [api.example.com]
  rules: [{backendRefs: [{name: echo-v1, port: 443}]}]
`

const tlsRoutes = tlsExact + `---
kind: TLSRoute
metadata: {name: wild, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 443}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: echo-v1, port: 443, weight: 1}, {name: echo-v2, port: 443, weight: 1}]}]
---
kind: TLSRoute
metadata: {name: broken, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 443}]
  hostnames: [broken.example.com]
  rules: [{backendRefs: [{name: empty, port: 443}]}]
`

// TLSRoutes route by the ClientHello's SNI (exact before wildcard), weights drawn per
// connection; the TLS bytes pass untouched to the backend, which terminates them.
func TestTLSRouteSNI(t *testing.T) {
	b := newL4Bed(t, nil, strings.Split(tlsRoutes, "---")...)
	for range 3 {
		if pod, err := b.exchange(t, "10.96.0.30:443", "api.example.com", payload(t, 100<<10)); err != nil || pod != "echo-v1" {
			t.Fatalf("api.example.com: %s, %v; want echo-v1 (the exact hostname)", pod, err)
		}
	}
	if counts := b.spread(t, "10.96.0.30:443", "web.example.com", 10, 1000); counts["echo-v1"] != 5 || counts["echo-v2"] != 5 {
		t.Errorf("10 connections over weights 1:1 went %v, want 5 and 5", counts)
	}
	// No route takes example.com, and broken's backend has no endpoint: the stream, accepted
	// to read its ClientHello, is reset; the handshake fails.
	for _, sni := range []string{"example.com", "broken.example.com"} {
		if pod, err := b.exchange(t, "10.96.0.30:443", sni, []byte("x")); err == nil {
			t.Errorf("%s went to %s, want the stream reset", sni, pod)
		}
	}
}

// Refusals: a TCPRoute backend without endpoints, an unknown backend, and a rule without a
// weighted backend refuse the CONNECT (503) before anything is dialed; a stream no route takes
// (an SNI no TLSRoute names, on a port without a TCPRoute) is reset once its ClientHello said
// so. Each is counted as Envoy's waypoint counts a connection it closes without an upstream
// (istio_tcp_connections_opened/closed_total with the response flag: UH, NC, NR) and logged in
// the access log with its reason. A service without endpoints of its own is still routed to its
// TCPRoute's backends.
func TestTCPRouteRefusals(t *testing.T) {
	m := metrics.New(prometheus.NewRegistry())
	var mu sync.Mutex
	var log bytes.Buffer
	b := newL4Bed(t, func(h *waypoint.Handler) {
		h.Metrics, h.AccessLog = m, slog.New(slog.NewJSONHandler(lockedWriter{&mu, &log}, nil))
	}, `
kind: TCPRoute
metadata: {name: to-empty, namespace: demo}
spec:
  parentRefs: [{name: echo-v1, port: 5432}]
  rules: [{backendRefs: [{name: empty, port: 5432}]}]
`, `
kind: TCPRoute
metadata: {name: unknown, namespace: demo}
spec:
  parentRefs: [{name: echo-v2, port: 5432}]
  rules: [{backendRefs: [{name: nosuch, port: 5432}]}]
`, `
kind: TCPRoute
metadata: {name: weightless, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 5432}]
  rules: [{backendRefs: [{name: echo-v1, port: 5432, weight: 0}]}]
`, `
kind: TCPRoute
metadata: {name: from-empty, namespace: demo}
spec:
  parentRefs: [{name: empty, port: 5432}]
  rules: [{backendRefs: [{name: echo-v2, port: 5432}]}]
`, tlsExact)
	for _, target := range []string{"10.96.0.31:5432", "10.96.0.32:5432", "10.96.0.30:5432"} {
		_, err := b.exchange(t, target, "", []byte("x"))
		var se *hbone.StatusError
		if !errors.As(err, &se) || se.Code != 503 {
			t.Errorf("%s: %v, want the CONNECT refused with 503", target, err)
		}
	}
	if pod, err := b.exchange(t, "10.96.0.30:443", "other.example.com", []byte("x")); err == nil {
		t.Errorf("other.example.com went to %s, want the stream reset", pod)
	}
	if pod, err := b.exchange(t, "10.96.0.33:5432", "", []byte("hello")); err != nil || pod != "echo-v2" {
		t.Errorf("empty's TCPRoute: %s, %v; want echo-v2", pod, err)
	}
	// The ports without routes are forwarded to the addressed service as before.
	if pod, err := b.exchange(t, "10.96.0.31:9000", "", []byte("hello")); err != nil || pod != "echo-v1" {
		t.Errorf("echo-v1:9000 (no route): %s, %v; want echo-v1", pod, err)
	}

	refusals := []struct{ service, flags, err string }{
		{"echo-v1", "UH", "waypoint: hbone: upstream unavailable: TCPRoute demo/to-empty: route: no ready endpoint for demo/empty"},
		{"echo-v2", "NC", "waypoint: hbone: upstream unavailable: TCPRoute demo/unknown: "},
		{"echo", "NC", "waypoint: hbone: upstream unavailable: TCPRoute demo/weightless: no backend has a weight"},
		{"echo", "NR", `waypoint: hbone: upstream unavailable: no TLSRoute or TCPRoute of demo/echo port 443 takes the stream (SNI "other.example.com")`},
	}
	for _, c := range []*prometheus.CounterVec{m.Opened, m.Closed} {
		for flags, want := range map[string]float64{"UH": 1, "NC": 2, "NR": 1} {
			if got := metrics.Sum(c, map[string]string{"response_flags": flags, "reporter": "waypoint"}); got != want {
				t.Errorf("streams with response_flags %s: %v, want %v", flags, got, want)
			}
		}
		if got := metrics.Sum(c, map[string]string{"response_flags": "NR", "destination_service": "echo.demo.svc.cluster.local",
			"source_principal": "spiffe://cluster.local/ns/demo/sa/client", "destination_workload": "unknown"}); got != 1 {
			t.Errorf("the NR stream's labels: %v matched, want 1", got)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var logged []struct{ service, flags, err string }
	for line := range strings.Lines(log.String()) {
		var rec struct{ Msg, Service, Flags, Err string }
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("%v: %q", err, line)
		}
		if rec.Msg == "stream" && rec.Flags != "-" {
			logged = append(logged, struct{ service, flags, err string }{strings.TrimSuffix(rec.Service, ".demo.svc.cluster.local"), rec.Flags, rec.Err})
		}
	}
	if len(logged) != len(refusals) {
		t.Fatalf("access log: %d refused streams %v, want %d", len(logged), logged, len(refusals))
	}
	for i, want := range refusals {
		if got := logged[i]; got.service != want.service || got.flags != want.flags || !strings.HasPrefix(got.err, want.err) {
			t.Errorf("access log refusal %d: %+v, want %+v", i, got, want)
		}
	}
}
