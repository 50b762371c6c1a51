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
// their ztunnel), and ztunnel-like clients sending HTTP requests through the waypoint, two of
// them refused by AuthorizationPolicy (a namespace not allowed in, a path denied). No cluster needed.
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
			if d.duration <= 0 {
				return fmt.Errorf("--duration must be positive, got %v", d.duration)
			}
			return d.run(cmd.Context(), cmd.OutOrStdout())
		},
	}
	cmd.Flags().DurationVar(&d.duration, "duration", 5*time.Second, "how long to send traffic (Ctrl-C stops earlier)")
	cmd.Flags().IntVar(&d.streams, "streams", 4, "concurrent client streams")
	return cmd
}

const (
	demoTD        = "cluster.local"
	demoWaypoint  = "spiffe://cluster.local/ns/demo/sa/detour"
	demoSleep     = "spiffe://cluster.local/ns/default/sa/sleep"
	demoIntruder  = "spiffe://cluster.local/ns/untrusted/sa/curl"
	demoServiceIP = "10.96.0.10"
)

// demoConfig is the waypoint's configuration document: service echo at 10.96.0.10:80 with two
// pods, a policy that lets only namespace default in, and one that keeps everyone out of /admin.
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
discovery:
  static:
    services:
    - name: echo
      namespace: demo
      vips: [%s]
      ports: [{name: http, port: 80, targetPort: 8080}]
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
`, caDir, demoWaypoint, podPort, demoServiceIP, eps)
}

func (d *demo) run(ctx context.Context, out io.Writer) error {
	quiet := slog.New(slog.DiscardHandler)
	dir, err := os.MkdirTemp("", "detour-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ca, err := devca.Init(filepath.Join(dir, "ca"), demoTD)
	if err != nil {
		return err
	}
	pods := []string{"127.0.0.2", "127.0.0.3"}
	podPort, stopPods, err := startDemoPods(ca, pods, quiet)
	if err != nil {
		return err
	}
	defer stopPods()
	cfg, err := config.Decode([]byte(demoConfig(filepath.Join(dir, "ca"), pods, podPort)))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ready := make(chan listening, 1)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return runWaypoint(gctx, cfg, quiet, io.Discard, ready) })
	var addrs listening
	select {
	case addrs = <-ready:
	case <-gctx.Done():
		return g.Wait()
	}
	fmt.Fprintf(out, "detour waypoint %s as %s (dev CA in %s)\n", addrs.HBONE, demoWaypoint, filepath.Join(dir, "ca"))
	fmt.Fprintf(out, "metrics: http://%s/metrics (health: /healthz, /readyz)\n", addrs.Health)
	fmt.Fprintf(out, "service echo.demo at %s:80 (http) -> pods %v, each behind its own HBONE terminator on port %d\n", demoServiceIP, pods, podPort)
	fmt.Fprintf(out, "AuthorizationPolicy demo/only-default: ALLOW from namespace default\n")
	fmt.Fprintf(out, "AuthorizationPolicy demo/no-admin: DENY paths /admin*\n")

	err = d.traffic(gctx, out, ca, addrs.HBONE)
	if err == nil {
		err = demoMetrics(gctx, out, addrs.Health)
	}
	cancel()
	return errors.Join(err, g.Wait())
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
func (c *demoClient) do(ctx context.Context, method, path string, body []byte) (int, []byte, string, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+demoServiceIP+":80"+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, "", err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, "", err
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	return resp.StatusCode, got, resp.Header.Get("X-Pod"), err
}

// traffic runs the clients for the demo's duration and prints a line a second.
func (d *demo) traffic(ctx context.Context, out io.Writer, ca *devca.CA, wp string) error {
	clientOpts, err := demoDialOpts(ca, demoSleep)
	if err != nil {
		return err
	}
	intruderOpts, err := demoDialOpts(ca, demoIntruder)
	if err != nil {
		return err
	}
	dialer := &hbone.Dialer{Logger: slog.New(slog.DiscardHandler)}
	defer dialer.Close()
	client := newDemoClient(dialer, wp, clientOpts, d.streams)
	defer client.http.CloseIdleConnections()
	intruder := newDemoClient(dialer, wp, intruderOpts, 1)
	defer intruder.http.CloseIdleConnections()
	// The two denials, shown up front.
	for _, den := range []struct {
		c         *demoClient
		who, path string
	}{{intruder, demoIntruder, "/"}, {client, demoSleep, "/admin/users"}} {
		code, body, _, err := den.c.do(ctx, "GET", den.path, nil)
		if err != nil || code != http.StatusForbidden || string(body) != "RBAC: access denied" {
			return fmt.Errorf("demo: GET %s by %s was not refused: %d %q %v", den.path, den.who, code, body, err)
		}
		fmt.Fprintf(out, "%s -> GET echo%s: %d %s (AuthorizationPolicy denial, as expected)\n", den.who, den.path, code, body)
	}

	var ok, failed atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	pods := map[string]int{}
	tctx, cancel := context.WithTimeout(ctx, d.duration)
	defer cancel()
	g, gctx := errgroup.WithContext(tctx)
	for range d.streams {
		g.Go(func() error {
			msg := make([]byte, 1024)
			// The duration stops new requests; the one in flight finishes (Ctrl-C cancels it).
			for gctx.Err() == nil {
				rand.Read(msg)
				start := time.Now()
				code, echo, pod, err := client.do(ctx, "POST", "/echo", msg)
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
	if failed.Load() > 0 {
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

// startDemoPods runs, on each pod IP, an HTTP app on :8080 (HTTP/1.1 and HTTP/2) that echoes
// request bodies and names itself in X-Pod, and an HBONE terminator (detour's server with a
// Forwarder, as the pod's ztunnel) on one shared port.
func startDemoPods(ca *devca.CA, ips []string, log *slog.Logger) (int, func(), error) {
	svid, err := ca.Issue("spiffe://cluster.local/ns/demo/sa/echo", time.Time{}, time.Time{})
	if err != nil {
		return 0, nil, err
	}
	podID := identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()})
	probe, err := net.Listen("tcp", ips[0]+":0")
	if err != nil {
		return 0, nil, fmt.Errorf("demo: loopback %s: %w", ips[0], err)
	}
	port := probe.Addr().(*net.TCPAddr).Port
	probe.Close()
	var closers []func()
	stop := func() {
		for _, c := range closers {
			c()
		}
	}
	for _, ip := range ips {
		app, err := net.Listen("tcp", ip+":8080")
		if err != nil {
			stop()
			return 0, nil, fmt.Errorf("demo: pod %s: %w", ip, err)
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
		closers = append(closers, func() { as.Close() })
		hl, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			stop()
			return 0, nil, fmt.Errorf("demo: pod %s HBONE: %w", ip, err)
		}
		srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(podID, nil), Logger: log}
		go srv.Serve(hl)
		closers = append(closers, func() { srv.Close() })
	}
	return port, stop, nil
}
