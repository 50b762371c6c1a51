package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/devsession"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// tunnelFlags reach a waypoint's tunnel listener with an identity.
type tunnelFlags struct {
	waypoint   string // host:port of the tunnel listener
	transport  string // quic or h2
	waypointID string // expected waypoint identity; "" accepts any member of the trust domain
	caDir, id  string // dev CA: mint our own SVID
	cert, key  string // or files
	bundle     string
	// or the mesh CA, for a service account the developer may use
	serviceAccount string // NS/NAME
	kubeconfig     string
	istiod         string
	meshRoot       string
	portForward    string // NAMESPACE[/WAYPOINT]: reach the waypoint through the API server
	kubeContext    string // the kubeconfig context; "": its current one
}

func (f *tunnelFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.waypoint, "waypoint", "", "the waypoint's tunnel address, host:port (or --port-forward; steal, mirror and run without either: the service's istio.io/use-waypoint waypoint, through a port-forward)")
	fl.StringVar(&f.portForward, "port-forward", "", "reach the waypoint through a Kubernetes port-forward to one of its pods, NAMESPACE[/WAYPOINT] (HTTP/2 tunnel; uses --kubeconfig)")
	fl.StringVar(&f.transport, "transport", "quic", "quic, or h2 when only TCP reaches the waypoint (a port-forward)")
	fl.StringVar(&f.waypointID, "waypoint-id", "", "the waypoint's SPIFFE ID to insist on (default: any identity of the trust domain)")
	fl.StringVar(&f.caDir, "ca", "", "a dev CA directory (detour ca init) to mint your identity from, with --id")
	fl.StringVar(&f.id, "id", "", "your SPIFFE ID, with --ca")
	fl.StringVar(&f.cert, "cert", "", "your SVID certificate (PEM), with --key and --bundle")
	fl.StringVar(&f.key, "key", "", "your SVID key (PEM)")
	fl.StringVar(&f.bundle, "bundle", "", "the trust bundle (PEM)")
	fl.StringVar(&f.serviceAccount, "service-account", "", "get a mesh identity from istiod's CA for this service account, NAMESPACE/NAME (a token through your kubeconfig: TokenRequest)")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig for --service-account, --port-forward and detour run (default: $KUBECONFIG or ~/.kube/config)")
	fl.StringVar(&f.kubeContext, "context", "", "the kubeconfig context to use (default: its current context)")
	fl.StringVar(&f.istiod, "istiod", "istiod.istio-system.svc:15012", "istiod's CA address, for --service-account (e.g. through kubectl port-forward)")
	fl.StringVar(&f.meshRoot, "mesh-root", "", "the mesh root certificate (PEM), for --service-account (default: the istio-ca-root-cert ConfigMap of the account's namespace)")
}

// dialer resolves the identity and returns a Dialer for the waypoint (a new port-forward per dial
// with --port-forward, so that a reconnection reaches whichever pod now serves), the identity, the
// address for messages and the transport to start with.
func (f *tunnelFlags) dialer(ctx context.Context, log *slog.Logger) (dial devsession.Dialer, src identity.Source, addr, transport string, err error) {
	if f.waypoint == "" && f.portForward == "" {
		return nil, nil, "", "", errors.New("--waypoint or --port-forward is required")
	}
	if src, err = f.identity(ctx, log); err != nil {
		return nil, nil, "", "", err
	}
	authorize, err := f.authorizer()
	if err != nil {
		return nil, nil, "", "", err
	}
	addr, transport = f.waypoint, f.transport
	if f.portForward != "" {
		addr, transport = "port-forward "+f.portForward, "h2" // a port-forward carries TCP only
	}
	dial = func(ctx context.Context, transport string, timeout time.Duration) (*tunnel.Tunnel, error) {
		to := f.waypoint
		if f.portForward != "" {
			pf, err := f.forward(ctx) // lives until ctx ends: the Runner's, once done with the tunnel
			if err != nil {
				return nil, err
			}
			to = pf.Addr()
		}
		dctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		return tunnel.Dial(dctx, transport, to, src, authorize, log)
	}
	return dial, src, addr, transport, nil
}

func (f *tunnelFlags) authorizer() (tlsconfig.Authorizer, error) {
	if f.waypointID == "" {
		return nil, nil
	}
	id, err := spiffeid.FromString(f.waypointID)
	if err != nil {
		return nil, fmt.Errorf("--waypoint-id: %w", err)
	}
	return tlsconfig.AuthorizeID(id), nil
}

func (f *tunnelFlags) dial(ctx context.Context, log *slog.Logger) (*tunnel.Tunnel, error) {
	t, _, err := f.dialWith(ctx, log)
	return t, err
}

// dialWith also returns the developer's identity source.
func (f *tunnelFlags) dialWith(ctx context.Context, log *slog.Logger) (*tunnel.Tunnel, identity.Source, error) {
	if f.portForward != "" {
		pf, err := f.forward(ctx)
		if err != nil {
			return nil, nil, err
		}
		f.waypoint, f.transport = pf.Addr(), "h2" // a port-forward carries TCP only
	}
	if f.waypoint == "" {
		return nil, nil, errors.New("--waypoint or --port-forward is required")
	}
	src, err := f.identity(ctx, log)
	if err != nil {
		return nil, nil, err
	}
	var authorize tlsconfig.Authorizer
	if f.waypointID != "" {
		id, err := spiffeid.FromString(f.waypointID)
		if err != nil {
			return nil, nil, fmt.Errorf("--waypoint-id: %w", err)
		}
		authorize = tlsconfig.AuthorizeID(id)
	}
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	t, err := tunnel.Dial(dctx, f.transport, f.waypoint, src, authorize, log)
	return t, src, err
}

// forward reaches the waypoint named by --port-forward through the API server, until ctx ends.
func (f *tunnelFlags) forward(ctx context.Context) (*mesh.PortForward, error) {
	ns, name, _ := strings.Cut(f.portForward, "/")
	if ns == "" {
		return nil, fmt.Errorf("--port-forward %q: want NAMESPACE or NAMESPACE/WAYPOINT", f.portForward)
	}
	if name == "" {
		name = "detour"
	}
	c, err := mesh.UserClientsContext(f.kubeconfig, f.kubeContext)
	if err != nil {
		return nil, err
	}
	return mesh.ForwardWaypoint(ctx, c, ns, name)
}

func (f *tunnelFlags) identity(ctx context.Context, log *slog.Logger) (identity.Source, error) {
	switch {
	case f.serviceAccount != "":
		return f.meshIdentity(ctx, log)
	case f.caDir != "" && f.id != "":
		ca, err := devca.Load(f.caDir)
		if err != nil {
			return nil, err
		}
		svid, err := ca.Issue(f.id, time.Time{}, time.Time{})
		if err != nil {
			return nil, err
		}
		return identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()}), nil
	case f.cert != "" && f.key != "" && f.bundle != "":
		files := &identity.Files{CertFile: f.cert, KeyFile: f.key, BundleFile: f.bundle, Logger: log}
		if _, err := files.Fetch(); err != nil {
			return nil, err
		}
		return files, nil
	}
	return nil, errors.New("an identity is required: --service-account NS/NAME (istiod's CA), --ca DIR --id SPIFFE-ID, or --cert, --key and --bundle")
}

// meshIdentity gets a certificate for --service-account from istiod's CA, renewed until ctx ends.
func (f *tunnelFlags) meshIdentity(ctx context.Context, log *slog.Logger) (identity.Source, error) {
	ns, name, ok := strings.Cut(f.serviceAccount, "/")
	if !ok || ns == "" || name == "" {
		return nil, fmt.Errorf("--service-account %q: want NAMESPACE/NAME", f.serviceAccount)
	}
	c, err := mesh.UserClientsContext(f.kubeconfig, f.kubeContext)
	if err != nil {
		return nil, err
	}
	a := &mesh.AccountIdentity{Kube: c.Kube, Namespace: ns, Name: name, Istiod: f.istiod, Logger: log}
	if f.meshRoot != "" {
		if a.MeshRoot, err = os.ReadFile(f.meshRoot); err != nil {
			return nil, fmt.Errorf("--mesh-root: %w", err)
		}
	}
	return a.Start(ctx)
}

// sessionCmd is `detour steal` and `detour mirror`.
type sessionCmd struct {
	mode      string
	tunnel    tunnelFlags
	namespace string
	to        string
	headers   []string
	path      string
	method    string
	bind      bool
	force     bool
	grace     time.Duration
	log       func() *slog.Logger
}

func newSessionCmd(mode string, log func() *slog.Logger) *cobra.Command {
	c := &sessionCmd{mode: mode, log: log}
	what := map[string]string{
		"steal":  "Send a service's traffic (all of it, or the HTTP requests that match) to a local app instead",
		"mirror": "Send a copy of a service's traffic (all of it, or the HTTP requests that match) to a local app; its answers are discarded",
	}[mode]
	cmd := &cobra.Command{
		Use:         mode + " svc/NAME[:PORT] --to HOST:PORT [--waypoint ADDR]",
		Short:       what,
		Args:        exactArgs(1),
		Annotations: map[string]string{profileAnnotation: profileAll},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := c.tunnel.checkFor(cmd.Flags(), true); err != nil {
				return err
			}
			spec, err := c.spec(args[0])
			if err != nil {
				return err
			}
			if err := c.tunnel.findWaypoint(cmd.Context(), spec.Namespace, spec.Service, cmd.OutOrStdout()); err != nil {
				return err
			}
			return c.run(cmd.Context(), spec, cmd.OutOrStdout())
		},
	}
	c.tunnel.register(cmd)
	fl := cmd.Flags()
	fl.StringVarP(&c.namespace, "namespace", "n", "", "the service's namespace (default: the kubeconfig context's, else default)")
	fl.StringVar(&c.to, "to", "", "the local app, PORT (on 127.0.0.1) or HOST:PORT (required)")
	fl.StringArrayVar(&c.headers, "header", nil, "only requests with this header: NAME=VALUE or NAME:VALUE (exact), NAME~REGEX, or NAME (present); repeat: all must hold")
	fl.StringVar(&c.path, "path", "", "only requests whose path matches this regex")
	fl.StringVar(&c.method, "method", "", "only requests with this method")
	fl.DurationVar(&c.grace, "grace", devsession.DefaultGrace, "after a lost tunnel, how long to keep reconnecting to resume the session (the waypoint keeps it, its traffic going to the real service, at most its own grace); 0 ends the session with its tunnel")
	fl.BoolVar(&c.bind, "bind", false, "bind the service to the waypoint for this session only (it must be unbound; reverted when the session ends, or by a lease if the waypoint dies)")
	fl.BoolVar(&c.force, "force", false, "with --bind: bind even where Istio config detour does not implement (VirtualService, DestinationRule, EnvoyFilter, WasmPlugin, Telemetry, a route it refuses) applies to the service")
	cmd.ValidArgsFunction = targetArg(&c.tunnel, &c.namespace)
	completeKube(cmd, &c.tunnel)
	return cmd
}

// spec parses svc/NAME[:PORT] and the filter flags.
func (c *sessionCmd) spec(target string) (tunnel.Spec, error) {
	name, ok := strings.CutPrefix(target, "svc/")
	if !ok {
		name, ok = strings.CutPrefix(target, "pod/") // a sidecar pod, through `detour agent`
	}
	if !ok || name == "" {
		return tunnel.Spec{}, fmt.Errorf("target %q: want svc/NAME[:PORT] (or pod/NAME:PORT for a sidecar pod's agent)", target)
	}
	ns, err := c.tunnel.namespace(c.namespace)
	if err != nil {
		return tunnel.Spec{}, err
	}
	spec := tunnel.Spec{Namespace: ns, Service: name, Mode: tunnel.Mode(c.mode)}
	if n, p, found := strings.Cut(name, ":"); found {
		port, err := strconv.ParseUint(p, 10, 16)
		if err != nil || port == 0 {
			return tunnel.Spec{}, fmt.Errorf("target %q: port %q is not a number from 1 to 65535", target, p)
		}
		spec.Service, spec.Port = n, uint16(port)
	}
	if c.to, err = parseTo(c.to); err != nil {
		return tunnel.Spec{}, err
	}
	if spec.Filter, err = parseFilter(c.headers, c.path, c.method); err != nil {
		return tunnel.Spec{}, err
	}
	if c.force && !c.bind {
		return tunnel.Spec{}, errors.New("--force only applies with --bind: add --bind, or drop --force")
	}
	spec.Bind, spec.Force = c.bind, c.force
	return spec, nil
}

func (c *sessionCmd) run(ctx context.Context, spec tunnel.Spec, out io.Writer) error {
	log := c.log()
	dial, _, addr, transport, err := c.tunnel.dialer(ctx, log)
	if err != nil {
		return err
	}
	verb := map[string]string{"steal": "stealing", "mirror": "mirroring"}[c.mode]
	var failed atomic.Int64
	r := &devsession.Runner{Spec: spec, To: c.to, Addr: addr, Transport: transport, Dial: dial, Grace: runnerGrace(c.grace), Version: Version, Logger: log,
		Event: func(ev tunnel.Event) { fmt.Fprintln(out, eventLine(ev)) },
		Seen: func(_ tunnel.Meta, err error) {
			if err != nil && failed.Add(1) == 1 {
				fmt.Fprintf(out, "cannot reach the local app %s: %v\n", c.to, err)
			}
		},
		Notify: func(n devsession.Notice) {
			if n.Kind == devsession.Registered {
				fmt.Fprintf(out, "%s %s/%s port %s (%s) -> %s; %s; Ctrl-C ends it\n", verb, spec.Namespace, spec.Service,
					portName(spec.Port), filterText(spec.Filter), c.to, n)
				return
			}
			fmt.Fprintln(out, n)
		}}
	if err := r.Run(ctx); err != nil {
		return err
	}
	fmt.Fprintln(out, "session ended")
	return nil
}

// runnerGrace is devsession.Runner.Grace for the --grace flag: 0 there means no resume.
func runnerGrace(flag time.Duration) time.Duration {
	if flag <= 0 {
		return -1
	}
	return flag
}

func portName(p uint16) string {
	if p == 0 {
		return "(its only port)"
	}
	return strconv.Itoa(int(p))
}

func filterText(f tunnel.Filter) string {
	var parts []string
	for _, h := range f.HeaderMatches() {
		switch {
		case h.Value != "":
			parts = append(parts, "header "+h.Name+"="+h.Value)
		case h.Regex != "":
			parts = append(parts, "header "+h.Name+"~"+h.Regex)
		default:
			parts = append(parts, "header "+h.Name)
		}
	}
	if f.Path != "" {
		parts = append(parts, "path ~"+f.Path)
	}
	if f.Method != "" {
		parts = append(parts, "method "+f.Method)
	}
	if len(parts) == 0 {
		return "all traffic"
	}
	return strings.Join(parts, ", ")
}

// eventLine is one live line: a request with its status and latency, or a stream with its bytes.
func eventLine(ev tunnel.Event) string {
	took := (time.Duration(ev.Micros) * time.Microsecond).Round(10 * time.Microsecond)
	if ev.Kind == tunnel.EventRequest {
		status := strconv.Itoa(ev.Status)
		if ev.Error != "" {
			status = "error: " + ev.Error
		}
		return fmt.Sprintf("%s %s %s %s %v from %s", ev.Mode, ev.Method, ev.Path, status, took, ev.Source)
	}
	line := fmt.Sprintf("%s stream: %d B in, %d B out, %v, from %s", ev.Mode, ev.Received, ev.Sent, took, ev.Source)
	if ev.Error != "" {
		line += " (" + ev.Error + ")"
	}
	return line
}

func newSessionsCmd(log func() *slog.Logger) *cobra.Command {
	var f tunnelFlags
	var o output
	cmd := &cobra.Command{
		Use:         "sessions --waypoint ADDR [-o json|yaml]",
		Short:       "List a waypoint's debug sessions you may see (yours, and others' where a LIST, STEAL or MIRROR grant covers the port), with holders and counters",
		Args:        noArgs,
		Annotations: map[string]string{profileAnnotation: profileAll},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.check(); err != nil {
				return err
			}
			reply, err := f.ask(cmd, log(), tunnel.Hello{List: true})
			if err != nil {
				return err
			}
			return o.print(cmd.OutOrStdout(), append([]tunnel.SessionInfo{}, reply.Sessions...), func(out io.Writer) error {
				w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "SESSION\tMODE\tSERVICE\tPORT\tFILTER\tHOLDER\tSINCE\tSTREAMS\tREQUESTS\tDROPPED")
				for _, s := range reply.Sessions {
					fmt.Fprintf(w, "%s\t%s\t%s/%s\t%d\t%s\t%s\t%s\t%d\t%d\t%d\n", s.ID, s.Spec.Mode, s.Spec.Namespace, s.Spec.Service, s.Spec.Port,
						filterText(s.Spec.Filter), s.Holder, s.Since.Format(time.RFC3339), s.Streams, s.Requests, s.Dropped)
				}
				return w.Flush()
			})
		},
	}
	f.register(cmd)
	o.register(cmd)
	cmd.AddCommand(newSessionsEndCmd(log))
	return cmd
}

// newSessionsEndCmd is `detour sessions end ID`.
func newSessionsEndCmd(log func() *slog.Logger) *cobra.Command {
	var f tunnelFlags
	cmd := &cobra.Command{
		Use:         "end ID --waypoint ADDR",
		Short:       "End a debug session at the waypoint by its ID (its developer's, or any a STEAL, MIRROR or END grant on its port covers); its CLI is told and exits",
		Args:        exactArgs(1),
		Annotations: map[string]string{profileAnnotation: profileAll},
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := f.ask(cmd, log(), tunnel.Hello{End: args[0]}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "session %s ended\n", args[0])
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

// ask sends one Hello over a new tunnel and returns the waypoint's answer; a refusal is an error
// of its one line.
func (f *tunnelFlags) ask(cmd *cobra.Command, log *slog.Logger, h tunnel.Hello) (tunnel.Reply, error) {
	if err := f.check(cmd.Flags()); err != nil {
		return tunnel.Reply{}, err
	}
	t, err := f.dial(cmd.Context(), log)
	if err != nil {
		return tunnel.Reply{}, err
	}
	defer t.Close()
	if err := tunnel.WriteMsg(t.Control(), h); err != nil {
		return tunnel.Reply{}, err
	}
	var reply tunnel.Reply
	if err := tunnel.ReadMsg(t.Control(), &reply); err != nil {
		return tunnel.Reply{}, fmt.Errorf("reading the waypoint's answer: %w", err)
	}
	if !reply.OK {
		return tunnel.Reply{}, fmt.Errorf("the waypoint refused: %s", reply.Error)
	}
	return reply, nil
}
