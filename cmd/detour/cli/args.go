package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

// Argument-count checks whose error carries the command's usage line, so a missing or extra
// argument says what was wanted.

func noArgs(cmd *cobra.Command, args []string) error { return argCount(cmd, args, 0, 0) }

func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error { return argCount(cmd, args, n, n) }
}

func maxArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error { return argCount(cmd, args, 0, n) }
}

func minArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error { return argCount(cmd, args, n, -1) }
}

// argCount refuses fewer than lo or more than hi (-1: any) arguments.
func argCount(cmd *cobra.Command, args []string, lo, hi int) error {
	n := len(args)
	if n >= lo && (hi < 0 || n <= hi) {
		return nil
	}
	var want string
	switch {
	case hi == 0:
		want = "no arguments"
	case lo == hi:
		want = plural(lo, "argument")
	case hi < 0:
		want = "at least " + plural(lo, "argument")
	default:
		want = "at most " + plural(hi, "argument")
	}
	got := fmt.Sprint(n)
	if n > 0 {
		got = fmt.Sprintf("%d (%q)", n, args)
	}
	return fmt.Errorf("%s takes %s, got %s; usage: %s", cmd.Name(), want, got, cmd.UseLine())
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}
