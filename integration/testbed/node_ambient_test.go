package testbed

import (
	"net/netip"
	"strings"
	"testing"

	"istio.io/istio/cni/pkg/config"
	"istio.io/istio/cni/pkg/ipset"
)

// Istio CNI's host side as the ambient node writes it, in a network namespace of its own (the
// node writes it in the root one): Istio's builder's SNAT rule for host probes, the probe ipset
// with a pod's address, then what Close does: the node's addresses out of the set while other
// ambient nodes run, and the rules and the set gone when it is the last.
func TestIstioCNIHostRules(t *testing.T) {
	ns := NewNetwork(t).Pod(t, nil, "none", "host", "none")
	save := func() string {
		out, err := ns.Command("iptables-save", "-t", "nat").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables-save: %v: %s", err, out)
		}
		return string(out)
	}
	pod := netip.MustParseAddr("10.246.3.4")
	var set ipset.IPSet
	cniScope()
	err := ns.Do(func() error {
		host, _, err := ruleBuilders()
		if err != nil {
			return err
		}
		if set, err = ipset.NewIPSet(config.ProbeIPSet, false, ipset.RealNlDeps()); err != nil {
			return err
		}
		if err := host.CreateHostRulesForHealthChecks(); err != nil {
			return err
		}
		return set.AddIP(pod, hostProbeSetFamily, "uid-1", true)
	})
	if err != nil {
		t.Fatal(err)
	}
	rules := save()
	for _, want := range []string{
		"-A POSTROUTING -j ISTIO_POSTRT",
		"-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127",
	} {
		if !strings.Contains(rules, want) {
			t.Errorf("host rules lack %q:\n%s", want, rules)
		}
	}
	var left []netip.Addr
	err = ns.Do(func() error {
		host, _, err := ruleBuilders()
		if err != nil {
			return err
		}
		if err := removeAmbientHost(set, host, "10.246.3.0/24", false); err != nil {
			return err
		}
		if left, err = set.ListEntriesByIP(); err != nil {
			return err
		}
		return removeAmbientHost(set, host, "10.246.3.0/24", true)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("the node's addresses still in the probe set: %v", left)
	}
	if rules := save(); strings.Contains(rules, "ISTIO_POSTRT") {
		t.Errorf("host rules left after the last node:\n%s", rules)
	}
	if err := ns.Do(func() error { _, err := set.ListEntriesByIP(); return err }); err == nil {
		t.Error("the probe set still exists after the last node")
	}
}
