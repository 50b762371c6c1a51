//go:build !linux

package cli

import (
	"log/slog"
	"runtime"

	"github.com/spf13/cobra"
)

func newAgentCmd(_ func() *slog.Logger) *cobra.Command {
	return &cobra.Command{
		Use:                "agent",
		Short:              "Sidecar-mode pods only (Linux only): redirect what the sidecar forwards to the app's ports to debug sessions",
		DisableFlagParsing: true,
		RunE: func(*cobra.Command, []string) error {
			return agentLinuxOnly(runtime.GOOS)
		},
	}
}
