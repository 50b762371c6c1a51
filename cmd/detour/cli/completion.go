package cli

import (
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/mesh"
)

// Shell completion: cobra's `detour completion bash|zsh|fish|powershell` prints a script that
// asks `detour __complete` for candidates; the functions here add the cluster's namespaces
// (-n) and services (svc/NAME) through the kubeconfig (--kubeconfig, --context). A cluster that
// cannot be read completes nothing (a completion never prints an error).

// completionWait bounds a completion's Kubernetes read.
const completionWait = 5 * time.Second

// completeNames completes the names list returns, with prefix, that start with toComplete.
func completeNames(list func(ctx context.Context, kube *mesh.Clients) ([]string, error), f *tunnelFlags, prefix, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	c, err := mesh.UserClientsContext(f.kubeconfig, f.kubeContext)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(context.Background(), completionWait)
	defer cancel()
	names, err := list(ctx, c)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []cobra.Completion
	for _, n := range names {
		if strings.HasPrefix(prefix+n, toComplete) {
			out = append(out, prefix+n)
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

// completeServices completes svc/NAME in the namespace -n (or the context's) names.
func completeServices(f *tunnelFlags, namespace *string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	ns, err := f.namespace(*namespace)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	return completeNames(func(ctx context.Context, c *mesh.Clients) ([]string, error) {
		return mesh.ServiceNames(ctx, c.Kube, ns)
	}, f, "svc/", toComplete)
}

// completeKube registers the completion of cmd's -n/--namespace (the cluster's namespaces, read
// through f's kubeconfig).
func completeKube(cmd *cobra.Command, f *tunnelFlags) {
	cmd.RegisterFlagCompletionFunc("namespace", func(_ *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		return completeNames(func(ctx context.Context, c *mesh.Clients) ([]string, error) {
			return mesh.NamespaceNames(ctx, c.Kube)
		}, f, "", toComplete)
	})
}

// targetArg completes a command's one svc/NAME argument.
func targetArg(f *tunnelFlags, namespace *string) cobra.CompletionFunc {
	return func(_ *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return completeServices(f, namespace, toComplete)
	}
}
