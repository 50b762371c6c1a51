//go:build !linux

package cli

import (
	"errors"
	"log/slog"
	"runtime"

	"github.com/spf13/cobra"
)

// errAgentLinuxOnly is what `detour agent` says off Linux: it needs iptables and conntrack in the
// pod's network namespace.
var errAgentLinuxOnly = errors.New("agent: Linux only (it redirects with iptables and conntrack in a pod's network namespace); run it in the pod, not on " + runtime.GOOS)

func newAgentCmd(_ func() *slog.Logger) *cobra.Command {
	return &cobra.Command{
		Use:                "agent",
		Short:              "Sidecar-mode pods only (Linux only): redirect what the sidecar forwards to the app's ports to debug sessions",
		DisableFlagParsing: true,
		RunE: func(*cobra.Command, []string) error {
			return errAgentLinuxOnly
		},
	}
}
