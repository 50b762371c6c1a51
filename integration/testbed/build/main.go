// Command build builds and caches the test bed's binaries (kube-apiserver, istiod, pilot-agent, and the node's kubelet,
// kube-controller-manager, kube-scheduler and kube-proxy),
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
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	start := time.Now()
	b, err := testbed.EnsureBinaries(ctx, func(format string, args ...any) {
		fmt.Printf("[%6.1fs] "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	logf := func(format string, args ...any) {
		fmt.Printf("[%6.1fs] "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	}
	agent, err := testbed.PilotAgent(ctx, logf)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	node, err := testbed.EnsureNodeBinaries(ctx, logf)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("[%6.1fs] testbed binaries: etcd %s, kube-apiserver %s, istiod %s, pilot-agent %s, kubelet %s, kube-controller-manager %s, kube-scheduler %s, kube-proxy %s\n",
		time.Since(start).Seconds(), b.Etcd, b.KubeAPIServer, b.Istiod, agent, node.Kubelet, node.ControllerManager, node.Scheduler, node.Proxy)
}
