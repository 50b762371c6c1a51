package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/proxy/config"
)

// demo is detour's main job on an embedded default: a dev CA, detour as the waypoint of service
// echo (static config), two HTTP echo pods behind their own HBONE terminators (standing in for
// their ztunnel), ztunnel-like clients sending HTTP requests through the waypoint, two of them
// refused by AuthorizationPolicy (a namespace not allowed in, a path denied), and a developer's
// steal and mirror of the requests with a header. No cluster needed; every port is the kernel's
// pick on 127.0.0.1 (the pods' addresses are made up, and dialled through a map).
type demo struct {
	duration time.Duration
	streams  int
	log      func() *slog.Logger
}

func newDemoCmd(log func() *slog.Logger) *cobra.Command {
	d := &demo{log: log}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run detour as a waypoint on loopback with a built-in CA, demo pods and traffic (no cluster needed)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if d.streams < 1 || d.streams > 1000 {
				return fmt.Errorf("--streams must be 1..1000, got %d", d.streams)
			}
			if d.duration < 0 {
				return fmt.Errorf("--duration must be 0 (until Ctrl-C) or positive, got %v", d.duration)
			}
			return d.run(cmd.Context(), &lockedWriter{w: cmd.OutOrStdout()})
		},
	}
	cmd.Flags().DurationVar(&d.duration, "duration", 5*time.Second, "how long to send traffic; 0: until Ctrl-C (Ctrl-C always stops, and exits 0)")
	cmd.Flags().IntVar(&d.streams, "streams", 4, "concurrent client streams")
	return cmd
}

const (
	demoTD        = "cluster.local"
	demoWaypoint  = "spiffe://cluster.local/ns/demo/sa/detour"
	demoSleep     = "spiffe://cluster.local/ns/default/sa/sleep"
	demoIntruder  = "spiffe://cluster.local/ns/untrusted/sa/curl"
	demoDeveloper = "spiffe://cluster.local/ns/dev/sa/alice"
	demoServiceIP = "10.96.0.10"
	demoPodPort   = 8080  // the pods' app port (the service's targetPort)
	demoHBONEPort = 15008 // the pods' HBONE port (their ztunnel's)
)

// demoPods are the echo pods' made-up addresses.
var demoPods = []string{"10.244.0.2", "10.244.0.3"}

// demoConfig is the waypoint's configuration document: service echo at 10.96.0.10:80 with two
// pods, a policy that lets only namespace default in, one that keeps everyone out of /admin, and
// one that lets developer alice steal and mirror it.
func demoConfig(caDir string, pods []string, podPort int) string {
	eps := ""
	for _, ip := range pods {
		eps += fmt.Sprintf("        - {ip: %s, serviceAccount: echo}\n", ip)
	}
	return fmt.Sprintf(`identity:
  source: devca
  devca: {dir: %q, id: %s}
listeners:
  hbone: 127.0.0.1:0
  health: 127.0.0.1:0
  tunnel: 127.0.0.1:0
  upstreamHBONEPort: %d
waypoint:
  namespace: demo
  gateway: detour
  drain: {period: 0s, timeout: 1s}
discovery:
  static:
    services:
    - name: echo
      namespace: demo
      vips: [%s]
      ports: [{name: http, port: 80, targetPort: %d}]
      endpoints:
%s    policies:
    - name: only-default
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
        action: ALLOW
        rules:
        - from: [{source: {namespaces: [default]}}]
    - name: no-admin
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
        action: DENY
        rules:
        - to: [{operation: {paths: ["/admin*"]}}]
    - name: developers
      namespace: demo
      spec:
        targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: detour}]
        action: ALLOW
        rules:
        - from: [{source: {principals: [%q]}}]
          to: [{operation: {methods: [STEAL, MIRROR], hosts: [echo.demo.svc.cluster.local]}}]
`, caDir, demoWaypoint, podPort, demoServiceIP, demoPodPort, eps, strings.TrimPrefix(demoDeveloper, "spiffe://"))
}

func (d *demo) run(ctx context.Context, out io.Writer) error {
	quiet := slog.New(slog.DiscardHandler)
	dir, err := os.MkdirTemp("", "detour-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	caDir := filepath.Join(dir, "ca")
	ca, err := devca.Init(caDir, demoTD)
	if err != nil {
		return err
	}
	pods, err := startDemoPods(ca, demoPods, quiet)
	if err != nil {
		return err
	}
	defer pods.stop()
	cfg, err := config.Decode([]byte(demoConfig(caDir, demoPods, demoHBONEPort)))
	if err != nil {
		return err
	}
	// The waypoint outlives Ctrl-C until its metrics are shown.
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	ready := make(chan listening, 1)
	g, gctx := errgroup.WithContext(wctx)
	g.Go(func() error { return runWaypoint(gctx, cfg, quiet, io.Discard, ready, pods.dial) })
	var addrs listening
	select {
	case addrs = <-ready:
	case <-gctx.Done():
		return g.Wait()
	case <-ctx.Done():
		cancel()
		return g.Wait()
	}
	fmt.Fprintf(out, "detour waypoint %s as %s (dev CA in %s)\n", addrs.HBONE, demoWaypoint, caDir)
	fmt.Fprintf(out, "metrics: http://%s/metrics (health: /healthz, /readyz)\n", addrs.Health)
	fmt.Fprintf(out, "developer tunnel: %s (QUIC; HTTP/2 on the same TCP port)\n", addrs.Tunnel)
	fmt.Fprintf(out, "service echo.demo at %s:80 (http) -> pods %v, each behind its own HBONE terminator on port %d\n", demoServiceIP, demoPods, demoHBONEPort)
	fmt.Fprintf(out, "AuthorizationPolicy demo/only-default: ALLOW from namespace default\n")
	fmt.Fprintf(out, "AuthorizationPolicy demo/no-admin: DENY paths /admin*\n")
	fmt.Fprintf(out, "AuthorizationPolicy demo/developers: ALLOW STEAL, MIRROR of echo to %s\n", demoDeveloper)

	err = d.show(ctx, out, ca, caDir, addrs)
	if ctx.Err() != nil {
		fmt.Fprintln(out, "interrupted (Ctrl-C): stopping")
		err = nil
	}
	if err == nil {
		err = demoMetrics(gctx, out, addrs.Health)
	}
	cancel()
	return errors.Join(err, g.Wait())
}

// show is what the demo shows: the denials, a steal, a mirror, then the load.
func (d *demo) show(ctx context.Context, out io.Writer, ca *devca.CA, caDir string, addrs listening) error {
	clientOpts, err := demoDialOpts(ca, demoSleep)
	if err != nil {
		return err
	}
	dialer := &hbone.Dialer{Logger: slog.New(slog.DiscardHandler)}
	defer dialer.Close()
	client := newDemoClient(dialer, addrs.HBONE, clientOpts, d.streams)
	defer client.http.CloseIdleConnections()
	if err := demoDenials(ctx, out, ca, dialer, client, addrs.HBONE); err != nil {
		return err
	}
	dev := &demoDeveloperSide{caDir: caDir, tunnel: addrs.Tunnel, client: client}
	if err := dev.steal(ctx, out); err != nil {
		return err
	}
	if err := dev.mirror(ctx, out); err != nil {
		return err
	}
	return d.traffic(ctx, out, client)
}

// demoDenials shows the two AuthorizationPolicy denials.
func demoDenials(ctx context.Context, out io.Writer, ca *devca.CA, dialer *hbone.Dialer, client *demoClient, wp string) error {
	intruderOpts, err := demoDialOpts(ca, demoIntruder)
	if err != nil {
		return err
	}
	intruder := newDemoClient(dialer, wp, intruderOpts, 1)
	defer intruder.http.CloseIdleConnections()
	for _, den := range []struct {
		c         *demoClient
		who, path string
	}{{intruder, demoIntruder, "/"}, {client, demoSleep, "/admin/users"}} {
		code, body, _, err := den.c.do(ctx, "GET", den.path, nil, nil)
		if err != nil || code != http.StatusForbidden || string(body) != "RBAC: access denied" {
			return fmt.Errorf("demo: GET %s by %s was not refused: %d %q %v", den.path, den.who, code, body, err)
		}
		fmt.Fprintf(out, "%s -> GET echo%s: %d %s (AuthorizationPolicy denial, as expected)\n", den.who, den.path, code, body)
	}
	return nil
}

// demoClient sends HTTP/1.1 requests over HBONE streams to the waypoint, one stream per client
// connection, as ztunnel carries a pod's connections.
type demoClient struct {
	http    *http.Client
	streams atomic.Int64
}

func newDemoClient(dialer *hbone.Dialer, wp string, opts hbone.DialOptions, conns int) *demoClient {
	c := &demoClient{}
	c.http = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		MaxConnsPerHost: conns, MaxIdleConnsPerHost: conns,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			c.streams.Add(1)
			return dialer.Dial(ctx, wp, addr, opts)
		}}}
	return c
}

// do sends one request and returns the status, the body and the pod that answered.
func (c *demoClient) do(ctx context.Context, method, path string, header http.Header, body []byte) (int, []byte, string, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+demoServiceIP+":80"+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, "", err
	}
	maps.Copy(req.Header, header)
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, "", err
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	return resp.StatusCode, got, resp.Header.Get("X-Pod"), err
}

// traffic runs the clients for the demo's duration (0: until ctx ends) and prints a line a second.
func (d *demo) traffic(ctx context.Context, out io.Writer, client *demoClient) error {
	var ok, failed atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	pods := map[string]int{}
	tctx, cancel := context.WithCancel(ctx)
	if d.duration > 0 {
		tctx, cancel = context.WithTimeout(ctx, d.duration)
	}
	defer cancel()
	fmt.Fprintf(out, "load: %d clients of namespace default sending POST /echo (1 KiB each, no x-dev header)", d.streams)
	if d.duration == 0 {
		fmt.Fprintln(out, " until Ctrl-C")
	} else {
		fmt.Fprintf(out, " for %v\n", d.duration)
	}
	g, gctx := errgroup.WithContext(tctx)
	for range d.streams {
		g.Go(func() error {
			msg := make([]byte, 1024)
			// The duration stops new requests; the one in flight finishes (Ctrl-C cancels it).
			for gctx.Err() == nil {
				rand.Read(msg)
				start := time.Now()
				code, echo, pod, err := client.do(ctx, "POST", "/echo", nil, msg)
				if ctx.Err() != nil {
					return nil
				}
				if err != nil || code != http.StatusOK || !bytes.Equal(echo, msg) {
					failed.Add(1)
					continue
				}
				el := time.Since(start)
				ok.Add(1)
				mu.Lock()
				lat = append(lat, el)
				pods[pod]++
				mu.Unlock()
			}
			return nil
		})
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	start := time.Now()
	report := func() {
		mu.Lock()
		l := slices.Clone(lat)
		spread := fmt.Sprint(pods)
		mu.Unlock()
		slices.Sort(l)
		p := func(q float64) time.Duration {
			if len(l) == 0 {
				return 0
			}
			return l[int(q*float64(len(l)-1))].Round(time.Microsecond)
		}
		fmt.Fprintf(out, "[%4.1fs] requests ok %d, failed %d, p50 %v, p99 %v, per pod %s\n",
			time.Since(start).Seconds(), ok.Load(), failed.Load(), p(0.5), p(0.99), spread)
	}
loop:
	for {
		select {
		case <-tick.C:
			report()
		case <-tctx.Done():
			break loop
		}
	}
	if err := g.Wait(); err != nil {
		return err
	}
	report()
	if failed.Load() > 0 && ctx.Err() == nil {
		return fmt.Errorf("demo: %d requests failed", failed.Load())
	}
	fmt.Fprintf(out, "done: %d requests through the waypoint on %d HBONE streams, every echo byte-exact, 2 denied by policy\n", ok.Load(), client.streams.Load())
	return nil
}

// demoMetrics prints what the waypoint's own /metrics says about the run.
func demoMetrics(ctx context.Context, out io.Writer, health string) error {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+health+"/metrics", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("demo: scraping metrics: %w", err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return fmt.Errorf("demo: scraping metrics: %w", err)
	}
	by := func(name, label string) string {
		counts := map[string]float64{}
		for _, m := range mfs[name].GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label {
					counts[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
		keys := slices.Sorted(maps.Keys(counts))
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = fmt.Sprintf("%s=%.0f", k, counts[k])
		}
		return strings.Join(parts, " ")
	}
	fmt.Fprintf(out, "waypoint metrics: istio_requests_total by response_code: %s; detour_authz_decisions_total: %s\n",
		by("istio_requests_total", "response_code"), by("detour_authz_decisions_total", "decision"))
	return nil
}

func demoDialOpts(ca *devca.CA, id string) (hbone.DialOptions, error) {
	svid, err := ca.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		return hbone.DialOptions{}, err
	}
	tlsCfg, err := identity.ClientTLS(identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()}), spiffeid.RequireFromString(demoWaypoint))
	if err != nil {
		return hbone.DialOptions{}, err
	}
	return hbone.DialOptions{TLSConfig: tlsCfg, ServerID: demoWaypoint, LocalID: id,
		Forwarded: hbone.FormatForwarded(hbone.ForwardedElement{For: "10.244.9.9:40000"})}, nil
}

// demoPodSet are the demo's pods, each an app and an HBONE terminator on loopback ports the
// kernel picked, reached at made-up addresses through dial.
type demoPodSet struct {
	addrs   map[string]string // made-up IP:port -> loopback address
	closers []func()
}

// dial opens a connection to a pod's made-up address; any other address is refused.
func (p *demoPodSet) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	real, ok := p.addrs[addr]
	if !ok {
		return nil, fmt.Errorf("demo: no pod at %s", addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, real)
}

func (p *demoPodSet) stop() {
	for _, c := range p.closers {
		c()
	}
}

// startDemoPods runs, for each pod IP, an HTTP app (HTTP/1.1 and HTTP/2) that echoes request
// bodies and names itself in X-Pod, and an HBONE terminator (detour's server with a Forwarder,
// as the pod's ztunnel), both on 127.0.0.1 ports the kernel picks.
func startDemoPods(ca *devca.CA, ips []string, log *slog.Logger) (*demoPodSet, error) {
	svid, err := ca.Issue("spiffe://cluster.local/ns/demo/sa/echo", time.Time{}, time.Time{})
	if err != nil {
		return nil, err
	}
	podID := identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()})
	p := &demoPodSet{addrs: map[string]string{}}
	for _, ip := range ips {
		app, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			p.stop()
			return nil, fmt.Errorf("demo: pod %s: %w", ip, err)
		}
		var protocols http.Protocols
		protocols.SetHTTP1(true)
		protocols.SetUnencryptedHTTP2(true)
		as := &http.Server{Protocols: &protocols, ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Pod", "pod "+ip)
			// HTTP/1: the whole body is read before the response starts (see http.ResponseWriter).
			body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
			if err != nil {
				http.Error(w, err.Error(), http.StatusRequestEntityTooLarge)
				return
			}
			w.Write(body)
		})}
		go as.Serve(app)
		p.closers = append(p.closers, func() { as.Close() })
		hl, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			p.stop()
			return nil, fmt.Errorf("demo: pod %s HBONE: %w", ip, err)
		}
		appAddr := net.JoinHostPort(ip, strconv.Itoa(demoPodPort))
		p.addrs[net.JoinHostPort(ip, strconv.Itoa(demoHBONEPort))] = hl.Addr().String()
		fwd := &hbone.Forwarder{Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr != appAddr {
				return nil, fmt.Errorf("demo: pod %s has nothing on %s", ip, addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, app.Addr().String())
		}}
		srv := &hbone.Server{Handler: fwd, TLSConfig: identity.ServerTLS(podID, nil), Logger: log}
		go srv.Serve(hl)
		p.closers = append(p.closers, func() { srv.Close() })
	}
	return p, nil
}

// lockedWriter serializes the writes of the demo's goroutines (its narration and the sessions'
// live lines) to one output.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
