package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/proxy/config"
)

// demo is detour's main job on an embedded default: a dev CA, detour as the waypoint of service
// echo (static config), two echo pods behind their own HBONE terminators (standing in for their
// ztunnel), and ztunnel-like clients sending streams through the waypoint, one of them from a
// namespace an AuthorizationPolicy refuses. No cluster needed.
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
		Args:  cobra.NoArgs,
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
	demoClient    = "spiffe://cluster.local/ns/default/sa/sleep"
	demoIntruder  = "spiffe://cluster.local/ns/untrusted/sa/curl"
	demoServiceIP = "10.96.0.10"
)

// demoConfig is the waypoint's configuration document: service echo at 10.96.0.10:80 with two
// pods, and a policy that lets only namespace default in.
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
      ports: [{name: tcp, port: 80, targetPort: 8080}]
      endpoints:
%s    policies:
    - name: only-default
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
        action: ALLOW
        rules:
        - from: [{source: {namespaces: [default]}}]
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
	g.Go(func() error { return runWaypoint(gctx, cfg, quiet, ready) })
	var addrs listening
	select {
	case addrs = <-ready:
	case <-gctx.Done():
		return g.Wait()
	}
	wpAddr := addrs.HBONE
	fmt.Fprintf(out, "detour waypoint %s as %s (dev CA in %s)\n", wpAddr, demoWaypoint, filepath.Join(dir, "ca"))
	fmt.Fprintf(out, "metrics: http://%s/metrics (health: /healthz, /readyz)\n", addrs.Health)
	fmt.Fprintf(out, "service echo.demo at %s:80 -> pods %v, each behind its own HBONE terminator on port %d\n", demoServiceIP, pods, podPort)
	fmt.Fprintf(out, "AuthorizationPolicy demo/only-default: ALLOW from namespace default\n")

	err = d.traffic(gctx, out, ca, wpAddr)
	cancel()
	return errors.Join(err, g.Wait())
}

// traffic runs the clients for the demo's duration and prints a line a second.
func (d *demo) traffic(ctx context.Context, out io.Writer, ca *devca.CA, wp string) error {
	client, err := demoDialOpts(ca, demoClient)
	if err != nil {
		return err
	}
	intruder, err := demoDialOpts(ca, demoIntruder)
	if err != nil {
		return err
	}
	dialer := &hbone.Dialer{Logger: slog.New(slog.DiscardHandler)}
	defer dialer.Close()
	target := demoServiceIP + ":80"
	// One denial, shown up front.
	_, err = dialer.Dial(ctx, wp, target, intruder)
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != 403 {
		return fmt.Errorf("demo: the intruder was not refused: %v", err)
	}
	fmt.Fprintf(out, "%s -> echo: %d (AuthorizationPolicy denial, as expected)\n", demoIntruder, se.Code)

	var ok, failed atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	pods := map[string]int{}
	tctx, cancel := context.WithTimeout(ctx, d.duration)
	defer cancel()
	g, gctx := errgroup.WithContext(tctx)
	for range d.streams {
		g.Go(func() error {
			for gctx.Err() == nil {
				start := time.Now()
				pod, err := demoRoundTrip(gctx, dialer, wp, target, client)
				if err != nil {
					if gctx.Err() != nil {
						return nil
					}
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
		fmt.Fprintf(out, "[%4.1fs] streams ok %d, failed %d, p50 %v, p99 %v, per pod %s\n",
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
		return fmt.Errorf("demo: %d streams failed", failed.Load())
	}
	fmt.Fprintf(out, "done: %d streams through the waypoint, every echo byte-exact, 1 denied by policy\n", ok.Load())
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

// demoRoundTrip sends 4 KiB of random bytes on a new stream and checks the echo; it returns the
// pod that answered.
func demoRoundTrip(ctx context.Context, d *hbone.Dialer, wp, target string, opts hbone.DialOptions) (string, error) {
	s, err := d.Dial(ctx, wp, target, opts)
	if err != nil {
		return "", err
	}
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Reset(0x8) })
	defer stop()
	msg := make([]byte, 4096)
	rand.Read(msg)
	if _, err := s.Write(msg); err != nil {
		return "", err
	}
	if err := s.CloseWrite(); err != nil {
		return "", err
	}
	got, err := io.ReadAll(s)
	if err != nil {
		return "", err
	}
	pod, echo, found := bytes.Cut(got, []byte{'\n'})
	if !found || !bytes.Equal(echo, msg) {
		return "", fmt.Errorf("demo: echo differs (%d bytes back)", len(got))
	}
	return string(pod), nil
}

// startDemoPods runs, on each pod IP, an app on :8080 that names itself then echoes, and an
// HBONE terminator (detour's server with a Forwarder, as the pod's ztunnel) on one shared port.
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
		closers = append(closers, serveApp(app, "pod "+ip))
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

// serveApp answers each connection with its name and a newline, then echoes.
func serveApp(l net.Listener, name string) func() {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.WriteString(c, name+"\n")
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return func() { l.Close(); wg.Wait() }
}
