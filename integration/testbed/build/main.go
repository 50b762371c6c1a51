// Command build builds and caches the test bed's control-plane binaries (kube-apiserver, istiod),
// printing each phase's time. `make testbed` runs it; tests would otherwise do it on first use.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/detour-mesh/detour/integration/testbed"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Minute)
	defer cancel()
	start := time.Now()
	b, err := testbed.EnsureBinaries(ctx, func(format string, args ...any) {
		fmt.Printf("[%6.1fs] "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("[%6.1fs] testbed binaries: etcd %s, kube-apiserver %s, istiod %s\n", time.Since(start).Seconds(), b.Etcd, b.KubeAPIServer, b.Istiod)
}
