package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/mesh"
)

// kubeFlags reach a cluster with the user's kubeconfig.
type kubeFlags struct {
	kubeconfig  string
	kubeContext string // --context, where a command offers it
	namespace   string
	name        string
}

func (k *kubeFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
	cmd.Flags().StringVarP(&k.namespace, "namespace", "n", "", "the namespace of the waypoint (required)")
	cmd.Flags().StringVar(&k.name, "name", "detour", "the waypoint's name (Gateway, Service, Deployment)")
}

func (k *kubeFlags) installer() (*mesh.Installer, error) {
	if k.namespace == "" {
		return nil, errors.New("--namespace is required")
	}
	c, err := mesh.UserClients(k.kubeconfig)
	if err != nil {
		return nil, err
	}
	return &mesh.Installer{Client: c.Dynamic, Namespace: k.namespace, Name: k.name}, nil
}

func newInstallCmd() *cobra.Command {
	var k kubeFlags
	var binds []string
	var takeOver, dryRun, print bool
	var image string
	cmd := &cobra.Command{
		Use:   "install -n NAMESPACE [--bind namespace|svc/NAME]...",
		Short: "Install detour as a waypoint in a namespace (server-side apply) and bind the namespace or services to it",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if print {
				in := &mesh.Installer{Namespace: k.namespace, Name: k.name, Image: image}
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
			in, err := k.installer()
			if err != nil {
				return err
			}
			in.TakeOver, in.DryRun, in.Image = takeOver, dryRun, image
			if err := in.Install(cmd.Context(), targets); err != nil {
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
	cmd.Flags().StringArrayVar(&binds, "bind", nil, "bind namespace, or svc/NAME, to this waypoint (repeatable)")
	cmd.Flags().BoolVar(&takeOver, "take-over", false, "replace another waypoint's binding (uninstall restores it)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "validate every object on the API server (server-side dry run), change nothing")
	cmd.Flags().BoolVar(&print, "print", false, "print the manifests instead of applying them (no cluster needed)")
	cmd.Flags().StringVar(&image, "image", mesh.Image, "the detour image (the default is a ko reference: ko resolve builds it)")
	return cmd
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
	return cmd
}
