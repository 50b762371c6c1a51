// Package cli holds detour's subcommands, one file each; each owns its flags.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
)

// Run executes the command line args and returns the process exit code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := &cobra.Command{
		Use:           "detour",
		Short:         "Istio-native, HBONE-aware proxy: steal or mirror live mesh traffic to a laptop",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       currentVersion().Version, // --version
	}
	root.SetVersionTemplate("detour {{.Version}}\n")
	var verbose bool
	root.PersistentFlags().BoolVarP(&verbose, "verbose", "v", false, "log at debug level")
	st := &settings{lookupEnv: os.LookupEnv}
	root.PersistentFlags().StringVar(&st.profile, "profile", "", "the CLI config file's profile to use (default: $DETOUR_PROFILE, else the file's defaultProfile)")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error { return st.apply(cmd) }
	logger := func() *slog.Logger {
		level := slog.LevelInfo
		if verbose {
			level = slog.LevelDebug
		}
		return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(newVersionCmd(), newDemoCmd(logger), newServeCmd(logger), newCACmd(), newWaypointCmd(logger),
		newSessionCmd("steal", logger), newSessionCmd("mirror", logger), newSessionsCmd(logger), newAgentCmd(logger),
		newInstallCmd(), newUninstallCmd(), newDoctorCmd(), newRunCmd(logger), newStatusCmd(st))
	if err := root.ExecuteContext(ctx); err != nil {
		var code exitCode
		if errors.As(err, &code) {
			return int(code) // detour run: CMD's own exit code
		}
		fmt.Fprintln(stderr, "detour:", err)
		return 1
	}
	return 0
}
