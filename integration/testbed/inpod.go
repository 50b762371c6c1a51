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
	if err := p.redirect(); err != nil {
		t.Fatal(err)
	}
	if c == nil {
		return
	}
	if err := annotateEnrolled(context.Background(), c, p.Namespace, p.Name); err != nil {
		t.Fatal(err)
	}
}

// redirect writes Istio CNI's in-pod rules in the pod's network namespace (the node agent's
// netnsRunner around CreateInpodRules).
func (p *Pod) redirect() error {
	if err := p.Do(createInpodRules); err != nil {
		return fmt.Errorf("testbed: Istio CNI's in-pod rules in pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// annotateEnrolled marks the Pod ambient.istio.io/redirection=enabled as the node agent does
// once the pod is captured (cni/pkg/util/podutil.go AnnotateEnrolledPod).
func annotateEnrolled(ctx context.Context, c *Cluster, ns, name string) error {
	pod, err := c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("testbed: reading pod %s/%s: %w", ns, name, err)
	}
	if err := util.AnnotateEnrolledPod(c.Client, &pod.ObjectMeta); err != nil {
		return fmt.Errorf("testbed: annotating pod %s/%s as enrolled: %w", ns, name, err)
	}
	return nil
}

// The node agent's default probe SNAT addresses (cni/pkg/nodeagent/options.go
// DefaultHostProbeSNATIP, DefaultHostProbeSNATIPV6; the package itself is not imported: it pulls
// in Istio's whole kube client).
const (
	hostProbeSNATIP   = "169.254.7.127"
	hostProbeSNATIPv6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
)

// createInpodRules runs in the pod's network namespace (the node agent's netnsRunner).
func createInpodRules() error {
	_, inpod, err := ruleBuilders()
	if err != nil {
		return err
	}
	return inpod.CreateInpodRules(cniScope(), config.PodLevelOverrides{})
}

// cniScope is the quiet log scope the test bed hands Istio CNI's code (warnings only).
func cniScope() *istiolog.Scope {
	quiet := istiolog.RegisterScope("testbed-cni", "Istio CNI's rule builder in the test bed")
	quiet.SetOutputLevel(istiolog.WarnLevel)
	scopes.CNIAgent.SetOutputLevel(istiolog.WarnLevel)
	return quiet
}

// ruleBuilders are Istio CNI's host and in-pod iptables configurators as server_linux.go
// initMeshDataplane makes them: the host probe SNAT address 169.254.7.127 (nodeagent
// DefaultHostProbeSNATIP), no DNS capture, IPv4 only. The node agent scopes the in-pod xtables
// lock to the pod's netns file; the test bed runs the binaries on the host's lock. The host's is
// forced to nft (the node agent's ForceIptablesBinary, FORCE_IPTABLES_BINARY), this machine's
// iptables: Istio's detection otherwise picks legacy once anything left legacy tables loaded,
// and a later run would then miss the rules it has to delete.
func ruleBuilders() (host, inpod *iptables.IptablesConfigurator, err error) {
	cfg := &config.AmbientConfig{
		HostProbeSNATAddress:   netip.MustParseAddr(hostProbeSNATIP),
		HostProbeV6SNATAddress: netip.MustParseAddr(hostProbeSNATIPv6),
	}
	hostDeps := &dep.RealDependencies{ForceIptablesBinary: "nft"}
	podDeps := &dep.RealDependencies{}
	host, inpod, err = iptables.NewIptablesConfigurator(cfg, cfg, hostDeps, podDeps, iptables.RealNlDeps())
	if err != nil {
		return nil, nil, fmt.Errorf("testbed: detecting iptables: %w", err)
	}
	return host, inpod, nil
}
