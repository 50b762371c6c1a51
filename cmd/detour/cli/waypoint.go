package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/config"
	"github.com/detour-mesh/detour/proxy/drain"
	"github.com/detour-mesh/detour/proxy/extauthz"
	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// identityTimeout bounds the wait for the first certificate at start (a variable for the test of
// what happens past it).
var identityTimeout = 30 * time.Second

func newWaypointCmd(log func() *slog.Logger) *cobra.Command {
	var path string
	var drainPeriod, drainTimeout time.Duration
	cmd := &cobra.Command{
		Use:   "waypoint",
		Short: "Run detour as a waypoint: terminate HBONE, enforce AuthorizationPolicy, forward to endpoints",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if path == "" {
				return errors.New("--config is required")
			}
			cfg, err := config.Load(path)
			if err != nil {
				return err
			}
			if err := overrideDrain(cmd, cfg, drainPeriod, drainTimeout); err != nil {
				return err
			}
			return runWaypoint(cmd.Context(), cfg, log(), cmd.ErrOrStderr(), nil, nil)
		},
	}
	cmd.Flags().StringVar(&path, "config", "", "the configuration document (YAML; see proxy/config)")
	cmd.Flags().DurationVar(&drainPeriod, "drain-period", 0,
		"on SIGTERM, how long to keep accepting (not ready, clients told to move) before stopping (default: waypoint.drain.period, 5s with Kubernetes discovery)")
	cmd.Flags().DurationVar(&drainTimeout, "drain-timeout", 0,
		"after the drain period, how long open streams may take to finish before they are closed (default: waypoint.drain.timeout, 20s)")
	return cmd
}

// overrideDrain puts the drain flags that were set over the document's fields, within the
// document's bounds.
func overrideDrain(cmd *cobra.Command, cfg *config.Config, period, timeout time.Duration) error {
	d := &cfg.Waypoint.Drain
	if cmd.Flags().Changed("drain-period") {
		if period < 0 || period > 5*time.Minute {
			return fmt.Errorf("--drain-period %s is outside 0s..5m", period)
		}
		d.Period = &config.Duration{Duration: period}
	}
	if cmd.Flags().Changed("drain-timeout") {
		if timeout < 0 || timeout > time.Hour {
			return fmt.Errorf("--drain-timeout %s is outside 0s..1h", timeout)
		}
		d.Timeout = &config.Duration{Duration: timeout}
	}
	return nil
}

// listening says where a running waypoint listens.
type listening struct {
	HBONE  string
	Health string // "" when off; serves /healthz, /readyz, /metrics
	Tunnel string // "" when off; QUIC (UDP) and HTTP/2 (TCP) developer tunnels
}

// runWaypoint serves the waypoint described by cfg until ctx ends (SIGTERM), then drains
// (proxy/drain, cfg.Waypoint.Drain): every component keeps running until the drain is over; a
// component that fails ends them all at once. ready, if set,
// receives the listeners' addresses once serving. The access log, when on, goes to accessOut.
// netDial, if set, opens the onward TCP connections (the demo's pods live at made-up addresses).
func runWaypoint(ctx context.Context, cfg *config.Config, log *slog.Logger, accessOut io.Writer, ready chan<- listening,
	netDial func(ctx context.Context, network, addr string) (net.Conn, error)) error {
	// Every listener before anything starts: a port in use ends the process here, at once.
	ls, err := listenWaypoint(cfg.Listeners)
	if err != nil {
		return err
	}
	defer ls.Close()
	src, keep, err := cfg.IdentitySource(log)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	sig := ctx
	ctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	g, ctx := errgroup.WithContext(ctx)
	// fail stops what already runs (identity renewal, discovery) and waits for it: a start-up
	// error ends the process, never leaves it half alive.
	fail := func(err error) error {
		stop()
		return errors.Join(err, g.Wait())
	}
	if keep != nil {
		g.Go(func() error { return keep(ctx) })
	}
	m := metrics.New(reg)
	disc, err := discovery(ctx, g, cfg, m, log)
	if err != nil {
		return fail(err)
	}
	defer disc.extAuthz.Close()
	wctx, cancel := context.WithTimeout(ctx, identityTimeout)
	stopWait := context.AfterFunc(sig, cancel) // a SIGTERM during start-up ends it
	defer stopWait()
	_, err = identity.Wait(wctx, src)
	cancel()
	if err != nil {
		return fail(fmt.Errorf("waypoint: no identity from %s: %w", cfg.Identity.Source, err))
	}
	l := ls.hbone
	onward := &hbone.Dialer{Logger: log, NetDial: netDial}
	defer onward.Close()
	h, err := newHandler(cfg, src, disc, m, onward, l, accessOut, log)
	if err != nil {
		return fail(err)
	}
	dr := serveHBONE(sig, ctx, g, stop, h, src, l, cfg.Waypoint.Drain, log)
	addrs := listening{HBONE: l.Addr().String()}
	if h.Sessions != nil {
		var store *mesh.SessionStore
		if disc.clients != nil {
			store = &mesh.SessionStore{Client: disc.clients.Dynamic, Namespace: cfg.Waypoint.Namespace, Replica: advertise(cfg, l),
				Registry: h.Sessions, Relay: h.RelayOpener, TTL: cfg.Waypoint.BindTTL.Duration, Logger: log}
			g.Go(func() error { return store.Run(ctx) })
		}
		serveTunnels(ctx, g, cfg, ls.tunnel, ls.tunnelUDP, src, h, disc, store, log)
		addrs.Tunnel = ls.tunnel.Addr().String()
	}
	if hl := ls.health; hl != nil {
		addrs.Health = hl.Addr().String()
		serveHealth(ctx, g, hl, healthMux(src, disc.synced, dr.Draining, reg))
	}
	log.Info("waypoint serving", "hbone", addrs.HBONE, "health", addrs.Health, "tunnel", addrs.Tunnel, "namespace", cfg.Waypoint.Namespace, "gateway", cfg.Waypoint.Gateway)
	if ready != nil {
		ready <- addrs
	}
	return g.Wait()
}

// newHandler is the waypoint's handler for cfg: routes and policies from discovery, the onward
// dialer, and the addresses that are the waypoint's own (a CONNECT to one, or through an
// endpoint at one, would be a forwarding loop).
func newHandler(cfg *config.Config, src identity.Source, disc *discovered, m *metrics.Metrics, onward *hbone.Dialer, l net.Listener,
	accessOut io.Writer, log *slog.Logger) (*waypoint.Handler, error) {
	h := &waypoint.Handler{
		Routes:     disc.routes,
		Balancer:   &route.Balancer{Policy: cfg.Waypoint.Balancer},
		Identity:   src,
		Dialer:     onward,
		Policies:   disc.policies,
		Authn:      disc.authn,
		ExtAuthz:   disc.extAuthz,
		Metrics:    m,
		HTTPRoutes: disc.httpRoutes,
		L4Routes:   disc.l4Routes,
		HBONEPort:  cfg.Listeners.UpstreamHBONEPort,
		Logger:     log,

		NumTrustedProxies: cfg.Waypoint.NumTrustedProxies,
		SniffWait:         cfg.Waypoint.SniffWait.Duration,
		MaxSniffing:       cfg.Waypoint.MaxSniffingPerClient,
	}
	var err error
	if h.Own, err = waypoint.OwnAddresses([]net.Addr{l.Addr()}, os.Getenv("POD_IP")); err != nil {
		return nil, err
	}
	if cfg.Listeners.Tunnel != "off" {
		h.Sessions = &session.Registry{}
	}
	switch cfg.Waypoint.Inspect {
	case "always":
		h.Inspect = waypoint.InspectAlways
	case "opaque":
		h.Inspect = waypoint.InspectOpaque
	}
	if cfg.Waypoint.AccessLog {
		h.AccessLog = slog.New(slog.NewJSONHandler(accessOut, nil))
	}
	return h, nil
}

// serveHBONE serves h on l in g. When sig ends (SIGTERM) it drains (proxy/drain: not ready,
// still accepting for the period, clients told to move, then open streams waited for up to the
// timeout) and then ends every other component (stop); when ctx ends first (a component
// failed) it closes at once.
func serveHBONE(sig, ctx context.Context, g *errgroup.Group, stop func(), h *waypoint.Handler, src identity.Source, l net.Listener,
	d config.Drain, log *slog.Logger) *drain.Drainer {
	srv := &hbone.Server{Handler: h, TLSConfig: identity.ServerTLS(src, nil), Logger: log}
	dr := &drain.Drainer{Server: srv, Period: d.Period.Duration, Timeout: d.Timeout.Duration, Logger: log}
	g.Go(func() error {
		if err := srv.Serve(l); !errors.Is(err, hbone.ErrServerClosed) {
			return err
		}
		return nil
	})
	g.Go(func() error {
		select {
		case <-ctx.Done():
			return srv.Close()
		case <-sig.Done():
		}
		defer stop()
		if err := dr.Drain(ctx); err != nil && !errors.Is(err, drain.ErrTimeout) {
			return err
		}
		return nil
	})
	return dr
}

// serveHealth serves mux on hl in g until ctx ends.
func serveHealth(ctx context.Context, g *errgroup.Group, hl net.Listener, mux http.Handler) {
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	g.Go(func() error {
		if err := hs.Serve(hl); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	g.Go(func() error { <-ctx.Done(); return hs.Close() })
}

// healthMux serves /healthz (the process is up), /readyz (it has an identity, discovery has
// synced and it is not draining) and /metrics.
func healthMux(src identity.Source, synced, draining func() bool, reg *prometheus.Registry) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if id, _ := src.Identity(); id == nil {
			http.Error(w, "no identity yet", http.StatusServiceUnavailable)
			return
		}
		if !synced() {
			http.Error(w, "discovery not synced yet", http.StatusServiceUnavailable)
			return
		}
		if draining() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// serveTunnels serves developer tunnels in g: QUIC on pc, HTTP/2 on tl (one port number).
func serveTunnels(ctx context.Context, g *errgroup.Group, cfg *config.Config, tl net.Listener, pc net.PacketConn, src identity.Source,
	h *waypoint.Handler, disc *discovered, store *mesh.SessionStore, log *slog.Logger) {
	m := &session.Manager{Registry: h.Sessions, Routes: h.Routes, Policies: h.Policies,
		Namespace: cfg.Waypoint.Namespace, Gateway: cfg.Waypoint.Gateway, Logger: log, Metrics: h.Metrics, Bind: disc.bind, CheckBind: disc.checkBind,
		Grace: cfg.Waypoint.SessionGrace.Duration, Version: Version}
	m.Egress.Handler, m.Egress.TLS = h, identity.ServerTLS(src, nil)
	if store != nil {
		m.Publisher = store
	}
	ts := &tunnel.Server{Identity: src, Handler: m.ServeTunnel, Logger: log}
	g.Go(func() error { return ts.ServeTCP(ctx, tl) })
	g.Go(func() error {
		err := ts.ServeQUIC(ctx, pc)
		pc.Close()
		return err
	})
}

// discovered is what a discovery source gives the waypoint.
type discovered struct {
	routes   func() *route.Table
	policies func() *authz.Engine
	authn    func() *authn.Authenticator
	// httpRoutes are the HTTPRoutes and GRPCRoutes attached to services.
	httpRoutes func() *httproute.Table
	// l4Routes are the TCPRoutes and TLSRoutes attached to services.
	l4Routes func() *l4route.Table
	synced   func() bool
	bind     func(ctx context.Context, namespace, service, session string) (func(), error) // nil: static
	// checkBind refuses a session's bind where Istio config detour does not implement would
	// apply (nil: static)
	checkBind func(namespace, service string) error
	clients   *mesh.Clients      // nil: static
	extAuthz  *extauthz.Registry // the mesh config's ext_authz providers
}

// discovery returns the route table and policies of cfg's discovery source: the document's static
// lists, or the Kubernetes API (informers, and the reconciler of per-session bindings, run in g
// until ctx ends).
func discovery(ctx context.Context, g *errgroup.Group, cfg *config.Config, m *metrics.Metrics, log *slog.Logger) (*discovered, error) {
	wp := authz.Waypoint{Namespace: cfg.Waypoint.Namespace, Gateway: cfg.Waypoint.Gateway, RootNamespace: cfg.Waypoint.RootNamespace}
	if cfg.Discovery.Source != "kubernetes" {
		table, err := cfg.Routes()
		if err != nil {
			return nil, err
		}
		engine, authenticator := cfg.Authz(), cfg.Authn(&authn.Keys{Logger: log}, nil)
		xa := &extauthz.Registry{}
		if err := xa.Update(cfg.ExtensionProviders()); err != nil {
			return nil, err
		}
		hr, err := cfg.HTTPRoutes()
		if err != nil {
			return nil, err
		}
		lr, err := cfg.L4Routes()
		if err != nil {
			return nil, err
		}
		return &discovered{routes: func() *route.Table { return table }, policies: func() *authz.Engine { return engine },
			authn: func() *authn.Authenticator { return authenticator }, synced: func() bool { return true }, extAuthz: xa,
			httpRoutes: func() *httproute.Table { return hr }, l4Routes: func() *l4route.Table { return lr }}, nil
	}
	k := cfg.Discovery.Kubernetes
	if k == nil {
		k = &config.Kubernetes{}
	}
	c, err := mesh.WorkloadClients(k.Kubeconfig)
	if err != nil {
		return nil, err
	}
	d := &mesh.Discovery{Kube: c.Kube, Istio: c.Istio, Gateway: c.Gateway, Namespace: k.Namespace, Waypoint: wp, Logger: log}
	xa := &extauthz.Registry{}
	d.MeshConfig = func(mc *meshv1alpha1.MeshConfig) {
		if err := xa.Update(mc.GetExtensionProviders()); err != nil {
			log.Warn("waypoint: extension providers left out; CUSTOM policies naming them deny what they match", "err", err)
		}
	}
	// The Istio objects detour does not implement, as the waypoint's gauge.
	d.UnsupportedConfig = func(list []mesh.Unsupported) {
		objs := make([]metrics.Config, 0, len(list))
		for _, u := range list {
			objs = append(objs, metrics.Config{Kind: u.Kind, Namespace: u.Namespace, Name: u.Name})
		}
		m.SetUnsupported(objs)
	}
	g.Go(func() error { return d.Run(ctx) })
	holder, _ := os.Hostname()
	b := &mesh.Binder{Kube: c.Kube, Waypoint: cfg.Waypoint.Gateway, Namespace: cfg.Waypoint.Namespace, Holder: holder,
		TTL: cfg.Waypoint.BindTTL.Duration, Logger: log}
	g.Go(func() error { return b.Run(ctx) })
	checkBind := func(namespace, service string) error {
		list, err := d.UnsupportedFor(namespace, service)
		if err != nil {
			return fmt.Errorf("mesh: cannot check svc/%s for Istio config detour does not implement (pass --force to bind anyway): %w", service, err)
		}
		if len(list) > 0 {
			return mesh.RefuseUnsupported("svc/"+service, list, "--force")
		}
		return nil
	}
	return &discovered{routes: d.Routes, policies: d.Policies, authn: d.Authn, httpRoutes: d.HTTPRoutes, l4Routes: d.L4Routes, synced: d.Ready,
		bind: b.Bind, checkBind: checkBind, clients: c, extAuthz: xa}, nil
}

// advertise is this replica's HBONE address for the others.
func advertise(cfg *config.Config, l net.Listener) string {
	if cfg.Listeners.Advertise != "" {
		return cfg.Listeners.Advertise
	}
	port := l.Addr().(*net.TCPAddr).Port
	if ip := os.Getenv("POD_IP"); ip != "" {
		return net.JoinHostPort(ip, strconv.Itoa(port))
	}
	return l.Addr().String()
}
