// Command detour is an Istio-native, HBONE-aware proxy for debugging against live mesh traffic.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/detour-mesh/detour/cmd/detour/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
