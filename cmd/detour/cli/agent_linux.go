//go:build linux

package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/detour-mesh/detour/agent"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/config"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/sidecar"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// agentCmd is `detour agent`: the sidecar-mode fallback, run inside the target pod's network
// namespace (an ephemeral container with NET_ADMIN, or a node agent entering /proc/PID/ns/net).
type agentCmd struct {
	config       string
	pod          string
	ports        string
	redirectPort uint16
	uid          uint32
	log          func() *slog.Logger
}

func newAgentCmd(log func() *slog.Logger) *cobra.Command {
	a := &agentCmd{log: log}
	cmd := &cobra.Command{
		Use:   "agent --config FILE --pod NS/NAME --ports P[,P...]",
		Short: "Sidecar-mode pods only: redirect what the sidecar forwards to the app's ports to debug sessions (run in the pod's network namespace)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.run(cmd.Context(), cmd)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&a.config, "config", "", "the configuration document: identity, listeners.tunnel, waypoint and policies (required)")
	fl.StringVar(&a.pod, "pod", "", "the pod, NAMESPACE/NAME: sessions name it as svc/NAME (required)")
	fl.StringVar(&a.ports, "ports", "", "the application's ports to take, comma-separated (required)")
	fl.Uint16Var(&a.redirectPort, "redirect-port", 15099, "the agent's listener for redirected connections, on 127.0.0.1")
	fl.Uint32Var(&a.uid, "sidecar-uid", agent.SidecarUID, "the sidecar's user ID")
	return cmd
}

func (a *agentCmd) parse() (ns, name string, ports []uint16, err error) {
	if a.config == "" || a.pod == "" || a.ports == "" {
		return "", "", nil, errors.New("--config, --pod and --ports are required")
	}
	ns, name, ok := strings.Cut(a.pod, "/")
	if !ok || ns == "" || name == "" {
		return "", "", nil, fmt.Errorf("--pod %q: want NAMESPACE/NAME", a.pod)
	}
	for _, p := range strings.Split(a.ports, ",") {
		n, err := strconv.ParseUint(strings.TrimSpace(p), 10, 16)
		if err != nil || n == 0 {
			return "", "", nil, fmt.Errorf("--ports: %q is not a port", p)
		}
		ports = append(ports, uint16(n))
	}
	return ns, name, ports, nil
}

func (a *agentCmd) run(ctx context.Context, cmd *cobra.Command) (err error) {
	ns, name, ports, err := a.parse()
	if err != nil {
		return err
	}
	cfg, err := config.Load(a.config)
	if err != nil {
		return err
	}
	log := a.log()
	rules, err := agent.NewRules(a.redirectPort)
	if err != nil {
		return err
	}
	rules.UID = a.uid
	if err := rules.CheckAmbient(); err != nil {
		return err
	}
	// The listener first: a second agent in this namespace fails here, before it could sweep the
	// first one's rules.
	rl, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(a.redirectPort))))
	if err != nil {
		return fmt.Errorf("agent: redirect listener (is another agent running in this pod?): %w", err)
	}
	defer rl.Close()
	// The tunnel's too, before any rule or goroutine: a port in use ends the agent here, at once.
	tl, pc, err := listenTCPUDP(cfg.Listeners.Tunnel)
	if err != nil {
		return &listenError{Addr: cfg.Listeners.Tunnel, Name: "tunnel", Key: "listeners.tunnel", Err: err}
	}
	defer tl.Close()
	defer pc.Close()
	if err := rules.Sweep(); err != nil {
		return fmt.Errorf("agent: removing leftovers of an earlier agent: %w", err)
	}
	src, keep, err := cfg.IdentitySource(log)
	if err != nil {
		return err
	}
	if err := rules.Install(ports); err != nil {
		return errors.Join(err, rules.Remove())
	}
	defer func() {
		if rerr := rules.Remove(); rerr != nil {
			err = errors.Join(err, rerr)
			return
		}
		// Every flow on the taken ports was redirected to this agent, and conntrack keeps that
		// redirection for the flow's tuple after the rules are gone: a new connection that reuses
		// the tuple of one that just closed (conntrack re-opens an entry in CLOSE or TIME_WAIT
		// with its old NAT) would reach the closed redirect port and be reset. So they go too.
		n, ferr := agent.FlushRedirected(ports, localAddrs())
		if ferr != nil {
			log.Info("agent: rules removed; could not flush the redirected flows (a reused tuple may be reset for up to 2 min)", "err", ferr)
			return
		}
		log.Info("agent: rules removed", "flushed", n)
	}()
	if n, err := agent.FlushRedirected(ports, localAddrs()); err != nil {
		log.Info("agent: could not flush the sidecar's open connections (they keep reaching the app until they close)", "err", err)
	} else {
		log.Info("agent: flushed the sidecar's open connections to the taken ports", "flows", n)
	}
	svc := &route.Service{Name: name, Namespace: ns, Hostname: name + "." + ns + ".pod"}
	for _, p := range ports {
		svc.Ports = append(svc.Ports, route.Port{Port: p, TargetPort: p})
	}
	table, err := route.NewTable([]*route.Service{svc})
	if err != nil {
		return err
	}
	engine := cfg.Authz()
	reg := &session.Registry{}
	g, gctx := errgroup.WithContext(ctx)
	if keep != nil {
		g.Go(func() error { return keep(gctx) })
	}
	g.Go(func() error {
		return (&sidecar.Server{Registry: reg, Namespace: ns, Pod: name, OriginalDst: agent.OriginalDst, Logger: log}).Serve(gctx, rl)
	})
	m := &session.Manager{Registry: reg, Routes: func() *route.Table { return table }, Policies: func() *authz.Engine { return engine },
		Namespace: cfg.Waypoint.Namespace, Gateway: cfg.Waypoint.Gateway, Logger: log, Check: sidecar.CheckSpec, Version: Version}
	ts := &tunnel.Server{Identity: src, Handler: m.ServeTunnel, Logger: log}
	g.Go(func() error { return ts.ServeTCP(gctx, tl) })
	g.Go(func() error { return ts.ServeQUIC(gctx, pc) })
	log.Info("agent: serving", "pod", a.pod, "ports", a.ports, "redirect", rl.Addr().String(), "tunnel", tl.Addr().String())
	fmt.Fprintf(cmd.OutOrStdout(), "agent ready: taking ports %s of %s; tunnel %s\n", a.ports, a.pod, tl.Addr())
	return g.Wait()
}

// localAddrs are this namespace's addresses.
func localAddrs() []netip.Addr {
	var out []netip.Addr
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr())
		}
	}
	return out
}
