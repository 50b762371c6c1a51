package testbed

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"istio.io/istio/cni/pkg/config"
	"istio.io/istio/cni/pkg/iptables"
	"istio.io/istio/cni/pkg/scopes"
	"istio.io/istio/cni/pkg/util"
	istiolog "istio.io/istio/pkg/log"
	dep "istio.io/istio/tools/istio-iptables/pkg/dependencies"
)

// InpodMark is the packet mark ztunnel puts on every socket it opens in a pod (ztunnel
// src/config.rs DEFAULT_INPOD_MARK, Istio CNI cni/pkg/config InpodMark): the in-pod rules never
// redirect a packet carrying it.
const InpodMark = config.InpodMark

// EnrollAmbient does for the pod what Istio CNI's node agent does for each ambient pod
// (cni/pkg/nodeagent/net_linux.go AddPodToMesh, meshdataplane_linux.go): Istio's own rule builder
// (cni/pkg/iptables/iptables.go CreateInpodRules, configured as server_linux.go
// initMeshDataplane does: host probe SNAT 169.254.7.127, no DNS capture, IPv4) writes the in-pod
// iptables rules, the fwmark rule and the loopback route table inside the pod's network namespace,
// then the Pod is annotated ambient.istio.io/redirection=enabled (cni/pkg/util/podutil.go
// AnnotateEnrolledPod), which is what makes istiod give the workload the HBONE tunnel protocol.
// c nil skips the annotation (a pod without a Pod object). The rules go with the namespace.
//
// The pod also gets a default route on eth0, as a node's CNI gives every pod: without one a
// connect to a ClusterIP fails with "network unreachable" before the rules can redirect it.
func (p *Pod) EnrollAmbient(t testing.TB, c *Cluster) {
	t.Helper()
	if err := ipCmd("-n", p.netns, "route", "add", "default", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := p.Do(createInpodRules); err != nil {
		t.Fatalf("testbed: Istio CNI's in-pod rules in pod %s: %v", p.Name, err)
	}
	if c == nil {
		return
	}
	pod, err := c.Client.CoreV1().Pods(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("testbed: reading pod %s/%s: %v", p.Namespace, p.Name, err)
	}
	if err := util.AnnotateEnrolledPod(c.Client, &pod.ObjectMeta); err != nil {
		t.Fatalf("testbed: annotating pod %s/%s as enrolled: %v", p.Namespace, p.Name, err)
	}
}

// createInpodRules runs in the pod's network namespace (the node agent's netnsRunner).
func createInpodRules() error {
	quiet := istiolog.RegisterScope("testbed-cni", "Istio CNI's rule builder in the test bed")
	quiet.SetOutputLevel(istiolog.WarnLevel)
	scopes.CNIAgent.SetOutputLevel(istiolog.WarnLevel)
	cfg := &config.AmbientConfig{
		HostProbeSNATAddress:   netip.MustParseAddr("169.254.7.127"),
		HostProbeV6SNATAddress: netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
	}
	// The node agent scopes the xtables lock to the pod's netns file; the test bed runs the
	// binaries on the host's lock (its namespaces are all one process's).
	deps := &dep.RealDependencies{}
	_, inpod, err := iptables.NewIptablesConfigurator(cfg, cfg, deps, deps, iptables.RealNlDeps())
	if err != nil {
		return fmt.Errorf("testbed: detecting iptables: %w", err)
	}
	return inpod.CreateInpodRules(quiet, config.PodLevelOverrides{})
}
