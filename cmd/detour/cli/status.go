package cli

import (
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// statusInfo is what `detour status` says: the settings a steal or mirror here would use, and
// where each came from. Nothing is contacted; files are read.
type statusInfo struct {
	Config      string            `json:"config,omitempty"`  // the CLI config file
	Profile     string            `json:"profile,omitempty"` // the profile used
	Waypoint    string            `json:"waypoint,omitempty"`
	PortForward string            `json:"portForward,omitempty"`
	Transport   string            `json:"transport"`
	WaypointID  string            `json:"waypointID,omitempty"`
	Identity    string            `json:"identity,omitempty"`
	Kubeconfig  string            `json:"kubeconfig,omitempty"` // "": $KUBECONFIG or ~/.kube/config
	Context     string            `json:"context,omitempty"`
	Namespace   string            `json:"namespace"`
	Filter      tunnel.Filter     `json:"filter,omitzero"`
	To          string            `json:"to,omitempty"`
	Sources     map[string]string `json:"sources,omitempty"` // flag name: --flag, $DETOUR_..., or profile NAME (FILE)
	Problems    []string          `json:"problems,omitempty"`
}

func newStatusCmd(st *settings) *cobra.Command {
	c := &sessionCmd{mode: "steal"}
	var o output
	cmd := &cobra.Command{
		Use:         "status [-o json|yaml]",
		Short:       "Show what a steal or mirror here would use: config file, profile, waypoint, identity, kubeconfig context, namespace, filter (contacts nothing)",
		Args:        noArgs,
		Annotations: map[string]string{profileAnnotation: profileAll},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.check(); err != nil {
				return err
			}
			s := c.status(cmd, st)
			err := o.print(cmd.OutOrStdout(), s, func(w io.Writer) error { return s.text(w) })
			if err == nil && len(s.Problems) > 0 {
				err = fmt.Errorf("%d problem(s) found", len(s.Problems))
			}
			return err
		},
	}
	c.tunnel.register(cmd)
	o.register(cmd)
	fl := cmd.Flags()
	fl.StringVarP(&c.namespace, "namespace", "n", "", "the service's namespace (default: the kubeconfig context's, else default)")
	fl.StringVar(&c.to, "to", "", "the local app, PORT or HOST:PORT")
	fl.StringArrayVar(&c.headers, "header", nil, "a header filter, as for detour steal")
	fl.StringVar(&c.path, "path", "", "the path filter")
	fl.StringVar(&c.method, "method", "", "the method filter")
	return cmd
}

func (c *sessionCmd) status(cmd *cobra.Command, st *settings) statusInfo {
	f := &c.tunnel
	s := statusInfo{Config: st.file, Profile: st.used, Waypoint: f.waypoint, PortForward: f.portForward, Transport: f.transport,
		WaypointID: f.waypointID, Kubeconfig: f.kubeconfig, Sources: st.sources}
	if f.portForward != "" {
		s.Transport = "h2"
	}
	switch {
	case f.serviceAccount != "":
		s.Identity = "service account " + f.serviceAccount + " (istiod's CA at " + f.istiod + ")"
	case f.caDir != "":
		s.Identity = f.id + " (dev CA " + f.caDir + ")"
	case f.cert != "":
		s.Identity = "files " + f.cert + ", " + f.key + ", " + f.bundle
	}
	problem := func(err error) {
		if err != nil {
			s.Problems = append(s.Problems, err.Error())
		}
	}
	problem(f.check(cmd.Flags()))
	name, ns, err := mesh.UserContext(f.kubeconfig, f.kubeContext)
	if err != nil && f.kubeContext != "" {
		problem(fmt.Errorf("--context %s: %w", f.kubeContext, err))
	}
	s.Context = name
	if s.Namespace = c.namespace; s.Namespace == "" {
		s.Namespace = ns
		if s.Namespace == "" {
			s.Namespace = "default"
		}
		st.sources["namespace"] = "the kubeconfig context"
		if name == "" {
			st.sources["namespace"] = "the default"
		}
	}
	var perr error
	s.Filter, perr = parseFilter(c.headers, c.path, c.method)
	problem(perr)
	if c.to != "" {
		s.To, perr = parseTo(c.to)
		problem(perr)
	}
	return s
}

func (s statusInfo) text(w io.Writer) error {
	line := func(k, v string) { fmt.Fprintf(w, "%-11s %s\n", k+":", v) }
	or := func(v, none string) string {
		if v == "" {
			return none
		}
		return v
	}
	cfg := "none (.detour.yaml here or in a parent, or ~/.config/detour/config.yaml)"
	if s.Config != "" {
		cfg = s.Config + ", profile " + or(s.Profile, "none")
	}
	line("config", cfg)
	if s.PortForward != "" {
		line("waypoint", "port-forward to "+s.PortForward+" over "+s.Transport)
	} else {
		line("waypoint", or(s.Waypoint, "none")+" over "+s.Transport)
	}
	line("identity", or(s.Identity, "none"))
	line("kubeconfig", or(s.Kubeconfig, "$KUBECONFIG or ~/.kube/config")+", context "+or(s.Context, "none"))
	line("namespace", s.Namespace)
	line("filter", filterText(s.Filter))
	line("to", or(s.To, "none"))
	var keys []string
	for k, from := range s.Sources {
		if !strings.HasPrefix(from, "--") {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		line("  "+k, "from "+s.Sources[k])
	}
	for _, p := range s.Problems {
		line("problem", p)
	}
	return nil
}
