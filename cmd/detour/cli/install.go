package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/mesh"
)

// kubeFlags reach a cluster with the user's kubeconfig.
type kubeFlags struct {
	kubeconfig  string
	kubeContext string // --context, where a command offers it
	namespace   string
	name        string
	// rootNamespace is istiod's root namespace (install and uninstall: the mesh config's Role).
	rootNamespace string
}

func (k *kubeFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
	cmd.Flags().StringVarP(&k.namespace, "namespace", "n", "", "the namespace of the waypoint (required)")
	cmd.Flags().StringVar(&k.name, "name", "detour", "the waypoint's name (Gateway, Service, Deployment)")
}

// registerRoot adds --root-namespace, for the commands that write or remove the mesh config's Role.
func (k *kubeFlags) registerRoot(cmd *cobra.Command) {
	cmd.Flags().StringVar(&k.rootNamespace, "root-namespace", "istio-system",
		"istiod's root namespace: the waypoint is let read its mesh config ConfigMap there (extensionProviders for CUSTOM policies)")
}

func (k *kubeFlags) installer() (*mesh.Installer, error) {
	if k.namespace == "" {
		return nil, errors.New("--namespace is required")
	}
	c, err := mesh.UserClients(k.kubeconfig)
	if err != nil {
		return nil, err
	}
	return &mesh.Installer{Client: c.Dynamic, Kube: c.Kube, Namespace: k.namespace, Name: k.name, RootNamespace: k.rootNamespace}, nil
}

func newInstallCmd() *cobra.Command {
	var k kubeFlags
	var binds []string
	var takeOver, dryRun, print, force bool
	var o installOptions
	cmd := &cobra.Command{
		Use:   "install -n NAMESPACE [--bind namespace|svc/NAME]...",
		Short: "Install detour as a waypoint in a namespace (server-side apply) and bind the namespace or services to it",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if print {
				in := &mesh.Installer{Namespace: k.namespace, Name: k.name, RootNamespace: k.rootNamespace}
				o.apply(in)
				if in.Namespace == "" {
					return errors.New("--namespace is required")
				}
				out, err := in.Manifests()
				if err != nil {
					return err
				}
				_, err = cmd.OutOrStdout().Write(out)
				return err
			}
			var targets []mesh.Target
			for _, b := range binds {
				t, err := mesh.ParseTarget(b)
				if err != nil {
					return err
				}
				targets = append(targets, t)
			}
			if o.image == "" {
				return fmt.Errorf("this detour is a development build (version %s) and no image was published for it: pass --image REF "+
					"(make image builds one, RELEASING.md), or use a release of detour, whose install defaults to %s:VERSION", Version, mesh.ImageRepository)
			}
			in, err := k.installer()
			if err != nil {
				return err
			}
			in.TakeOver, in.DryRun, in.Force = takeOver, dryRun, force
			o.apply(in)
			in.Progress = func(line string) { fmt.Fprintln(cmd.OutOrStdout(), line) }
			ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
			defer cancel()
			if err := in.Install(ctx, targets); err != nil {
				return err
			}
			verb := "installed"
			if dryRun {
				verb = "validated (dry run, nothing changed)"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "waypoint %s %s in %s (Gateway address %s)", k.name, verb, k.namespace, in.Hostname())
			for _, t := range targets {
				fmt.Fprintf(cmd.OutOrStdout(), "; bound %s", t)
			}
			fmt.Fprintln(cmd.OutOrStdout())
			return nil
		},
	}
	k.register(cmd)
	k.registerRoot(cmd)
	cmd.Flags().StringArrayVar(&binds, "bind", nil, "bind namespace, or svc/NAME, to this waypoint (repeatable)")
	cmd.Flags().BoolVar(&takeOver, "take-over", false, "replace another waypoint's binding (uninstall restores it)")
	cmd.Flags().BoolVar(&force, "force", false, "bind even where Istio config detour does not implement (VirtualService, DestinationRule, EnvoyFilter, WasmPlugin, Telemetry, a route it refuses) applies")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "validate every object on the API server (server-side dry run), change nothing")
	cmd.Flags().BoolVar(&print, "print", false, "print the manifests instead of applying them (no cluster needed)")
	o.register(cmd)
	return cmd
}

// installOptions are install's flags about the waypoint and how the install proceeds.
type installOptions struct {
	image       string
	wait        bool
	timeout     time.Duration
	keepPartial bool
	podMonitor  bool
	replicas    int
}

func (o *installOptions) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&o.image, "image", mesh.ReleaseImage(Version),
		"the detour image (default: this release's; a development build has none and needs --image; with --print, a ko reference)")
	cmd.Flags().BoolVar(&o.wait, "wait", true, "wait for the Deployment to be Available and the Gateway Programmed (a failed wait rolls back)")
	cmd.Flags().DurationVar(&o.timeout, "timeout", 5*time.Minute, "how long the whole install may take, its wait included")
	cmd.Flags().BoolVar(&o.keepPartial, "keep-partial", false, "keep what a failed install wrote (default: remove it again)")
	cmd.Flags().BoolVar(&o.podMonitor, "pod-monitor", false, "also create a Prometheus Operator PodMonitor for the waypoint's /metrics")
	cmd.Flags().IntVar(&o.replicas, "replicas", 2, "waypoint replicas (they share sessions)")
}

func (o *installOptions) apply(in *mesh.Installer) {
	in.Image, in.Replicas = o.image, o.replicas
	if mesh.ReleaseImage(Version) != "" {
		in.Version = Version // a development build's version names nothing to compare with
	}
	in.Wait, in.KeepPartial, in.Pod.PodMonitor = o.wait, o.keepPartial, o.podMonitor
}

func newUninstallCmd() *cobra.Command {
	var k kubeFlags
	cmd := &cobra.Command{
		Use:   "uninstall -n NAMESPACE",
		Short: "Remove detour's waypoint from a namespace and restore every binding it changed",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			in, err := k.installer()
			if err != nil {
				return err
			}
			if err := in.Uninstall(cmd.Context()); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "waypoint %s removed from %s; bindings restored\n", k.name, k.namespace)
			return nil
		},
	}
	k.register(cmd)
	k.registerRoot(cmd)
	return cmd
}
