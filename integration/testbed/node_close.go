package testbed

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Close stops the node and removes what it made outside n.Dir, also after a failed start: the
// kubelet first (so it recreates nothing) and kube-proxy, then every pod sandbox through the CRI
// (containerd runs CNI DEL, frees the address and deletes the pod's network namespace),
// containerd, the controller-manager and scheduler; then any mount left under n.Dir, the cgroup root, the CNI
// bridge, the iptables chains the kubelet adds and kube-proxy's nftables tables. Idempotent;
// the errors of every step joined.
func (n *Node) Close() error {
	n.once.Do(func() { n.err = n.close() })
	return n.err
}

func (n *Node) close() error {
	var errs []error
	stop := func(name string) {
		for _, p := range n.procs {
			if p.name == name {
				errs = append(errs, p.stop(10*time.Second))
			}
		}
	}
	stop("kubelet")
	stop("kube-proxy")
	errs = append(errs, n.restoreSysctls())
	if n.running("containerd") {
		errs = append(errs, n.removeSandboxes())
	}
	stop("containerd")
	if n.ambient != nil { // no ADD can come any more
		errs = append(errs, n.ambient.Close())
	} else if n.ambientDir != "" {
		errs = append(errs, os.RemoveAll(n.ambientDir))
	}
	stop("kube-controller-manager")
	stop("kube-scheduler")
	errs = append(errs, n.dns.Close())
	errs = append(errs, UnmountUnder(n.Dir), n.removeCgroups(), n.removeBridge())
	if !othersAlive(n.recordPath(), anyRecord) {
		if n.started("kubelet") {
			errs = append(errs, removeKubeletChains())
		}
		if n.started("kube-proxy") {
			errs = append(errs, removeKubeProxyTables())
		}
	}
	if err := os.Remove(n.recordPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("testbed: %w", err))
	}
	if n.unlock != nil {
		n.unlock()
	}
	return errors.Join(errs...)
}

// restoreSysctls puts back the kernel settings the kubelet changed.
func (n *Node) restoreSysctls() error {
	var errs []error
	for k, v := range n.sysctls {
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("testbed: restoring %s: %w", k, err))
		}
	}
	return errors.Join(errs...)
}

// removeBridge deletes the node's CNI bridge if it is there.
func (n *Node) removeBridge() error {
	if n.bridge == "" {
		return nil
	}
	if _, err := os.Stat("/sys/class/net/" + n.bridge); err != nil {
		return nil
	}
	return ipCmd("link", "del", n.bridge)
}

// running reports whether a process of that name was started and is still running.
func (n *Node) running(name string) bool {
	for _, p := range n.procs {
		if p.name == name && p.exited() == nil {
			return true
		}
	}
	return false
}

// started reports whether a process of that name was started.
func (n *Node) started(name string) bool {
	for _, p := range n.procs {
		if p.name == name {
			return true
		}
	}
	return false
}

// removeSandboxes stops and removes every pod sandbox (and with it its containers) through
// containerd's CRI, 30 s at most.
func (n *Node) removeSandboxes() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+n.ContainerdSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("testbed: connecting to the CRI: %w", err)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	list, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return fmt.Errorf("testbed: listing pod sandboxes: %w", err)
	}
	var errs []error
	for _, s := range list.Items {
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: s.Id}); err != nil {
			errs = append(errs, fmt.Errorf("testbed: stopping sandbox of %s/%s: %w", s.Metadata.GetNamespace(), s.Metadata.GetName(), err))
			continue
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: s.Id}); err != nil {
			errs = append(errs, fmt.Errorf("testbed: removing sandbox of %s/%s: %w", s.Metadata.GetNamespace(), s.Metadata.GetName(), err))
		}
	}
	return errors.Join(errs...)
}

// removeCgroups removes the kubelet's cgroup root in every hierarchy, deepest first (the
// kubelet's kubepods tree and runc's container groups below it, once their tasks are gone).
func (n *Node) removeCgroups() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		root := filepath.Join(h, n.cgroup)
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.SortFunc(dirs, func(a, b string) int { return len(b) - len(a) })
		for _, d := range dirs {
			if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("testbed: removing cgroup %s: %w", d, err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeKubeletChains deletes what the kubelet's initNetworkUtil adds to the root namespace
// (pkg/kubelet/kubelet_network_linux.go): KUBE-FIREWALL, jumped to from INPUT and OUTPUT,
// KUBE-IPTABLES-HINT and the KUBE-KUBELET-CANARY chains, for IPv4 and IPv6. Absent ones are fine.
func removeKubeletChains() error {
	var errs []error
	for _, bin := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(bin); err != nil {
			continue
		}
		ipt := func(args ...string) error {
			out, err := exec.Command(bin, append([]string{"-w", "5"}, args...)...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("testbed: %s %s: %v: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
			}
			return nil
		}
		exists := func(table, chain string) bool {
			return exec.Command(bin, "-w", "5", "-t", table, "-S", chain).Run() == nil
		}
		for _, hook := range []string{"INPUT", "OUTPUT"} {
			for exec.Command(bin, "-w", "5", "-t", "filter", "-C", hook, "-j", "KUBE-FIREWALL").Run() == nil {
				if err := ipt("-t", "filter", "-D", hook, "-j", "KUBE-FIREWALL"); err != nil {
					errs = append(errs, err)
					break
				}
			}
		}
		for _, tc := range [][2]string{{"filter", "KUBE-FIREWALL"}, {"mangle", "KUBE-IPTABLES-HINT"},
			{"mangle", "KUBE-KUBELET-CANARY"}, {"nat", "KUBE-KUBELET-CANARY"}, {"filter", "KUBE-KUBELET-CANARY"}} {
			if !exists(tc[0], tc[1]) {
				continue
			}
			errs = append(errs, ipt("-t", tc[0], "-F", tc[1]), ipt("-t", tc[0], "-X", tc[1]))
		}
	}
	return errors.Join(errs...)
}

// removeKubeProxyTables deletes kube-proxy's nftables tables (pkg/proxy/nftables: table
// "kube-proxy" in the ip and ip6 families); kube-proxy leaves them when it stops.
func removeKubeProxyTables() error {
	var errs []error
	for _, family := range []string{"ip", "ip6"} {
		if exec.Command("nft", "list", "table", family, "kube-proxy").Run() != nil {
			continue
		}
		if out, err := exec.Command("nft", "delete", "table", family, "kube-proxy").CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("testbed: nft delete table %s kube-proxy: %v: %s", family, err, strings.TrimSpace(string(out))))
		}
	}
	return errors.Join(errs...)
}

// MountsUnder lists the mount points at or under dir, deepest first (/proc/self/mountinfo).
func MountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			points = append(points, mp)
		}
	}
	slices.SortFunc(points, func(a, b string) int { return len(b) - len(a) })
	return points, nil
}

// UnmountUnder unmounts (lazily, deepest first) every mount point under dir: the kubelet's
// projected volumes, containerd's snapshots and network namespaces left after a failure, a
// container's rootfs a killed shim left mounted.
func UnmountUnder(dir string) error {
	points, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range points {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("testbed: unmounting %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	var out strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var n int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &n); err == nil {
				out.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		out.WriteByte(s[i])
	}
	return out.String()
}
