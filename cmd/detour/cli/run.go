package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"

	"github.com/detour-mesh/detour/egress"
	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/devsession"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// ExitTunnelLost is detour run's exit code when the tunnel to the waypoint is lost past the grace
// period, or the waypoint ends the session (CMD is stopped), unless --keep-running.
const ExitTunnelLost = 75

// exitCode makes Run exit with code, without a message (CMD already spoke).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

type runCmd struct {
	session     sessionCmd
	target      string
	steal       bool
	mirror      bool
	envFile     string
	keepRunning bool
	container   string
	asTarget    bool
	flags       *pflag.FlagSet // the command's, to tell typed flags from a profile's
}

func newRunCmd(log func() *slog.Logger) *cobra.Command {
	r := &runCmd{session: sessionCmd{log: log}}
	cmd := &cobra.Command{
		Use:   "run --target svc/NAME [--steal|--mirror --to HOST:PORT] -- CMD ARGS...",
		Short: "Run CMD with the target's environment and the cluster's services within reach (through the waypoint, as you)",
		Long: `Run CMD with the target's environment and the cluster's services within reach (through the waypoint, as you).

The environment is the one the kubelet gave a container (--container, default the first) of a
Running pod the service selects (a Ready one first): envFrom and env with their ConfigMap and
Secret references (optional ones that are missing left out, as the kubelet does), $(VAR)
expansion, fieldRefs, resourceFieldRefs (a limit the container does not set is the node's
allocatable) and the service links of the pod's namespace (enableServiceLinks) and of
default/kubernetes, for the Services that existed when the container started. Not reproduced:
what the runtime and the image add (PATH, HOSTNAME, HOME, the image's Env) and fileKeyRef
variables (read inside the pod); detour names those it could not read on stderr. Values are read
now, with your kubeconfig: a ConfigMap changed since the pod started gives its new value.`,
		Args:        minArgs(1),
		Annotations: map[string]string{profileAnnotation: profileAll},
		RunE: func(cmd *cobra.Command, args []string) error {
			return r.run(cmd, args)
		},
	}
	r.session.tunnel.register(cmd)
	fl := cmd.Flags()
	fl.StringVarP(&r.session.namespace, "namespace", "n", "", "the target's namespace (default: the kubeconfig context's, else default)")
	fl.StringVar(&r.target, "target", "", "the service whose workload CMD stands in for, svc/NAME[:PORT] (required)")
	fl.BoolVar(&r.steal, "steal", false, "also steal the target's traffic to CMD (see detour steal)")
	fl.BoolVar(&r.mirror, "mirror", false, "also mirror the target's traffic to CMD (see detour mirror)")
	fl.StringVar(&r.session.to, "to", "", "with --steal or --mirror: where CMD listens, host:port")
	fl.StringArrayVar(&r.session.headers, "header", nil, "with --steal or --mirror: a header filter, repeatable (see detour steal)")
	fl.StringVar(&r.session.path, "path", "", "with --steal or --mirror: the path filter")
	fl.StringVar(&r.session.method, "method", "", "with --steal or --mirror: the method filter")
	fl.StringVar(&r.envFile, "env-file", "", "write the target's environment to this file instead of giving it to CMD")
	fl.BoolVar(&r.keepRunning, "keep-running", false, "keep CMD running if the tunnel to the waypoint is lost past --grace")
	fl.DurationVar(&r.session.grace, "grace", devsession.DefaultGrace, "after a lost tunnel, how long to keep reconnecting (and to resume the --steal or --mirror session) before CMD is stopped; 0: at once")
	fl.StringVar(&r.container, "container", "", "the container whose environment to take (default: the first one)")
	fl.BoolVar(&r.asTarget, "as-target", false, "CMD's outgoing connections carry the target's workload identity, not yours (needs an AuthorizationPolicy granting you IMPERSONATE on it)")
	cmd.RegisterFlagCompletionFunc("target", func(_ *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		return completeServices(&r.session.tunnel, &r.session.namespace, toComplete)
	})
	completeKube(cmd, &r.session.tunnel)
	return cmd
}

func (r *runCmd) run(cmd *cobra.Command, argv []string) error {
	ctx := cmd.Context()
	r.flags = cmd.Flags()
	log := r.session.log()
	if err := r.session.tunnel.checkFor(cmd.Flags(), true); err != nil {
		return err
	}
	ns, err := r.session.tunnel.namespace(r.session.namespace)
	if err != nil {
		return err
	}
	r.session.namespace = ns
	svcName, hello, err := r.hello()
	if err != nil {
		return err
	}
	if err := r.session.tunnel.findWaypoint(ctx, r.session.namespace, svcName, cmd.OutOrStdout()); err != nil {
		return err
	}
	kc, err := mesh.UserClientsContext(r.session.tunnel.kubeconfig, r.session.tunnel.kubeContext)
	if err != nil {
		return err
	}
	target, err := mesh.TargetEnv(ctx, kc.Kube, r.session.namespace, svcName, r.container)
	if err != nil {
		return err
	}
	for _, u := range target.Unset {
		fmt.Fprintf(cmd.ErrOrStderr(), "detour: not in the environment of pod %s: %s\n", target.Pod, u)
	}
	env := target.Vars
	if r.envFile != "" {
		if err := os.WriteFile(r.envFile, []byte(strings.Join(env, "\n")+"\n"), 0o600); err != nil {
			return err
		}
		env = nil
	}
	// The tunnel outlives a signal to detour: CMD gets the signal and the tunnel serves it until
	// it exits.
	tctx, cancelTunnel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelTunnel()
	dial, src, addr, transport, err := r.session.tunnel.dialer(tctx, log)
	if err != nil {
		return err
	}
	eg := newEgressLink()
	stderr := cmd.ErrOrStderr()
	// The session (with --steal or --mirror) and the egress link, across tunnels: a lost one is
	// reconnected, and the session resumed, within the grace period, as for detour steal.
	session := &devsession.Runner{To: r.session.to, AsTarget: hello.AsTarget, Addr: addr, Transport: transport, Dial: dial,
		Grace: runnerGrace(r.session.grace), Version: Version, Logger: log,
		Egress: func(ctx context.Context, c net.Conn) { eg.start(ctx, c, identity.ClientTLSAuthorized(src, nil), log) },
		Notify: func(n devsession.Notice) { fmt.Fprintf(stderr, "detour: %s\n", n) }}
	if hello.Register != nil {
		session.Spec = *hello.Register
	}
	if err := session.Register(tctx); err != nil {
		return err
	}
	// Everything that serves CMD runs in g, and is waited for once CMD is done and the tunnel closed.
	g, gctx := errgroup.WithContext(tctx)
	ended := make(chan error, 1) // the session's end while CMD runs
	g.Go(func() error {
		err := session.Serve(gctx)
		if err == nil {
			err = errors.New("the tunnel to the waypoint closed")
		}
		ended <- err
		return nil
	})
	defer func() {
		cancelTunnel()
		served := make(chan struct{})
		go func() { g.Wait(); close(served) }()
		select {
		case <-served:
		case <-time.After(exitWait): // a bug that must not keep CMD's exit code from the shell
			log.Error("detour run: what served CMD did not stop; exiting anyway", "after", exitWait)
		}
	}()
	cmdEnv, err := r.serve(gctx, g, eg, src, kc, log)
	if err != nil {
		return err
	}
	c := exec.Command(argv[0], argv[1:]...)
	c.Env = append(append(os.Environ(), env...), cmdEnv...)
	c.Stdin, c.Stdout, c.Stderr = cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr()
	if err := c.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", argv[0], err)
	}
	return r.supervise(ctx, stderr, c, ended)
}

// exitWait bounds the wait, once CMD is done, for what served it (proxies, resolver, tunnel).
const exitWait = 10 * time.Second

// hello is the tunnel's first message: egress for CMD, the target's identity with --as-target,
// a session with --steal or --mirror.
func (r *runCmd) hello() (svcName string, hello tunnel.Hello, err error) {
	if r.steal && r.mirror {
		return "", hello, errors.New("--steal and --mirror exclude each other")
	}
	if !r.steal && !r.mirror {
		for _, name := range []string{"to", "header", "path", "method"} {
			if typed(r.flags, name) {
				return "", hello, fmt.Errorf("--%s needs --steal or --mirror (it says where and what to take)", name)
			}
		}
	}
	svcName, ok := strings.CutPrefix(r.target, "svc/")
	if !ok || svcName == "" {
		return "", hello, fmt.Errorf("--target %q: want svc/NAME[:PORT]", r.target)
	}
	svcName, _, _ = strings.Cut(svcName, ":")
	hello = tunnel.Hello{Egress: true}
	if r.asTarget {
		hello.AsTarget = &tunnel.Target{Namespace: r.session.namespace, Service: svcName}
	}
	if r.steal || r.mirror {
		r.session.mode = map[bool]string{true: "steal", false: "mirror"}[r.steal]
		spec, err := r.session.spec(r.target)
		if err != nil {
			return "", hello, err
		}
		hello.Register = &spec
	}
	return svcName, hello, nil
}

// serve starts, in g, what CMD reaches the cluster through: the HTTP and SOCKS5 proxies and the
// DNS resolver over the egress link; it returns CMD's environment for them.
func (r *runCmd) serve(ctx context.Context, g *errgroup.Group, eg *egressLink, src identity.Source, kc *mesh.Clients, log *slog.Logger) ([]string, error) {
	p := &egress.Proxies{Dial: eg.dial, Resolve: mesh.ServiceResolver(kc.Kube, r.session.namespace), Logger: log}
	if id, _ := src.Identity(); id != nil {
		p.Principal = id.SVID.ID.String()
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	sl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		hl.Close()
		return nil, err
	}
	dnsTCP, dnsUDP, err := listenTCPUDP("127.0.0.1:0")
	if err != nil {
		hl.Close()
		sl.Close()
		return nil, fmt.Errorf("the DNS resolver's port: %w", err)
	}
	g.Go(func() error { return p.Serve(ctx, hl, sl) })
	g.Go(func() error { return (&egress.DNS{Resolve: p.Resolve}).Serve(ctx, dnsUDP, dnsTCP) })
	env := egress.Env(hl.Addr().String(), sl.Addr().String())
	return append(env, "DETOUR_DNS="+dnsUDP.LocalAddr().String()), nil // a resolver for cluster names, for tools that take one
}

// supervise waits for CMD and returns its exit code as detour's: a signal to detour goes on to
// CMD; the session's end (its tunnel lost past the grace period, or ended by the waypoint) stops
// CMD (exit ExitTunnelLost) unless --keep-running.
func (r *runCmd) supervise(ctx context.Context, stderr io.Writer, c *exec.Cmd, ended <-chan error) error {
	waited := make(chan error, 1)
	go func() { waited <- c.Wait() }() // returns when CMD does; every path below waits for it
	lost := ended
	for {
		select {
		case err := <-waited:
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					return exitCode(128 + int(ws.Signal())) // as a shell reports it
				}
				return exitCode(ee.ExitCode())
			}
			return err
		case <-ctx.Done(): // SIGINT or SIGTERM to detour: CMD gets it too
			c.Process.Signal(syscall.SIGINT)
			ctx = context.Background()
		case err := <-lost:
			lost = nil
			if r.keepRunning {
				fmt.Fprintf(stderr, "detour: %v; CMD keeps running (--keep-running)\n", err)
				continue
			}
			fmt.Fprintf(stderr, "detour: %v; stopping CMD\n", err)
			c.Process.Signal(syscall.SIGTERM)
			select {
			case <-waited:
			case <-time.After(10 * time.Second):
				c.Process.Kill()
				<-waited
			}
			return exitCode(ExitTunnelLost)
		}
	}
}

// egressWait bounds how long a connection of CMD's waits for an egress link: the first, or the
// next one while the tunnel is being reconnected.
const egressWait = 15 * time.Second

// egressLink is the HBONE connection the developer's outgoing connections share: the current
// tunnel's (each tunnel, the first and every reconnected one, brings its own).
type egressLink struct {
	mu    sync.Mutex
	cc    *hbone.ClientConn // the current link; nil before the first and once it went
	err   error             // why the current link could not start
	ready chan struct{}     // closed while there is a current link (or its error); renewed when it goes
}

func newEgressLink() *egressLink { return &egressLink{ready: make(chan struct{})} }

// start makes c, a new tunnel's egress link, the current one; it lives until ctx (its tunnel's)
// ends.
func (e *egressLink) start(ctx context.Context, c net.Conn, tlsCfg *tls.Config, log *slog.Logger) {
	cc, err := hbone.NewClientConn(ctx, c, tlsCfg, hbone.Config{}, log)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cc != nil && e.cc != cc {
		e.cc.Close()
	}
	e.cc, e.err = cc, err
	select {
	case <-e.ready:
	default:
		close(e.ready)
	}
}

// current is the live link (or why it failed), or else a channel closed when the next one comes.
func (e *egressLink) current() (*hbone.ClientConn, error, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	select {
	case <-e.ready:
	default:
		return nil, nil, e.ready
	}
	if e.cc != nil && gone(e.cc) { // its tunnel is lost: wait for the next
		e.cc, e.err, e.ready = nil, nil, make(chan struct{})
		return nil, nil, e.ready
	}
	return e.cc, e.err, nil
}

func gone(cc *hbone.ClientConn) bool {
	select {
	case <-cc.Done():
		return true
	default:
		return false
	}
}

// dial opens a connection to addr over the current link, waiting (at most egressWait) while there
// is none: before the first, and while a lost tunnel is reconnected.
func (e *egressLink) dial(ctx context.Context, addr string) (net.Conn, error) {
	timer := time.NewTimer(egressWait)
	defer timer.Stop()
	for {
		cc, err, next := e.current()
		if next == nil {
			if err != nil {
				return nil, fmt.Errorf("egress: %w", err)
			}
			s, err := cc.Dial(ctx, addr, hbone.DialOptions{})
			if err == nil {
				return s, nil
			}
			if !gone(cc) || ctx.Err() != nil {
				return nil, err
			}
			continue // the link went with its tunnel during the dial: try the next
		}
		select {
		case <-next:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timer.C:
			return nil, fmt.Errorf("egress: no link to the waypoint for %v (the tunnel is down and detour is reconnecting, or the waypoint never opened one)", egressWait)
		}
	}
}
