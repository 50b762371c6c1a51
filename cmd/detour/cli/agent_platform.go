package cli

import "errors"

// agentLinuxOnly is what `detour agent` says on goos, not Linux: it needs iptables and conntrack
// in the pod's network namespace. (Untagged, so Linux's tests check the words a Mac prints.)
func agentLinuxOnly(goos string) error {
	return errors.New("agent: Linux only (it redirects with iptables and conntrack in a pod's network namespace); run it in the pod, not on " + goos)
}
