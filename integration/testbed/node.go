package testbed

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NodeOptions say what a Node starts with. Images are imported before the kubelet starts, so
// that no image is ever pulled (no registry is reachable): pods use imagePullPolicy Never.
type NodeOptions struct {
	// Images are OCI image-layout archives imported into containerd's k8s.io namespace.
	Images []string
	// SandboxImage is the pause image's reference (one of Images): containerd's sandbox_image.
	SandboxImage string
	// Ambient puts Istio CNI's plugin (built from istio.io/istio, last in the conflist) on the
	// node and stands in for its node agent in the test process: ambient pods (Istio's
	// enablement selectors) get the in-pod rules and an in-pod ztunnel stand-in that routes from
	// istiod's workload xDS (see ambientAgent). Needs Options.Istiod. Default false: no Istio CNI.
	Ambient bool
}

// Node is one Kubernetes node of the test bed: Debian's containerd (1.6, its CRI plugin on,
// everything under Dir), runc, the bridge/host-local/loopback CNI plugins (Debian's
// containernetworking-plugins) with a CNI configuration of its own, a kubelet registered to the
// Cluster's API server with a client certificate, and kube-proxy; beside them the cluster's
// kube-controller-manager and kube-scheduler, so that Deployments, ServiceAccounts, their
// tokens, EndpointSlices and ClusterIP Services work as in any cluster. Fields are immutable after startNode.
type Node struct {
	Name   string // the Node object's name
	Dir    string // configs, logs, containerd's root and state, the kubelet's root
	IP     string // the node's address: the CNI bridge's gateway, also the kubelet's
	Subnet string // the pods' /24, e.g. 10.246.7.0/24
	// ContainerdSocket is containerd's gRPC socket (CRI and containerd's own API, for ctr).
	ContainerdSocket string

	bridge string // the CNI bridge, ours
	// ambientDir is Istio CNI's run directory with NodeOptions.Ambient (the agent's event
	// socket, the plugin's kubeconfig and log), "" without; ambient the agent.
	ambientDir string
	ambient    *ambientAgent
	dns        *clusterDNS
	cgroup     string // the kubelet's cgroupRoot, e.g. /detour-node-1a2b3c (every v1 hierarchy)
	procs      []*proc
	// sysctls are the kernel settings the kubelet changes (setupKernelTunables in
	// pkg/kubelet/cm/container_manager_linux.go) as they were before it started; Close puts them
	// back.
	sysctls map[string]string
	// unlock releases the machine's node lock (see lockNode).
	unlock func()
	once   sync.Once
	err    error
}

// nodeBridgePrefix names the node's CNI bridge (with the node's random id).
const nodeBridgePrefix = "dtn"

// newNode picks the node's name, subnet and bridge, sweeps what killed runs left and creates the
// bridge with the node's IP, before the API server starts: with a node, the API server serves on
// that address (pods reach it there, through the kubernetes Service). Close undoes it.
func newNode(c *Cluster) (n *Node, err error) {
	rnd := make([]byte, 3)
	rand.Read(rnd)
	id := hex.EncodeToString(rnd)
	n = &Node{Name: "testbed-node-" + id, Dir: filepath.Join(c.Dir, "node"), bridge: nodeBridgePrefix + id, cgroup: "/detour-node-" + id}
	sub := fmt.Sprintf("10.246.%d", 1+int(rnd[0])%250)
	n.IP, n.Subnet = sub+".1", sub+".0/24"
	n.ContainerdSocket = filepath.Join(n.Dir, "containerd.sock")
	if n.unlock, err = lockNode(c.logf); err != nil {
		return n, err
	}
	swept, err := sweepNodes()
	for _, s := range swept {
		c.logf("testbed: removed what a killed run left: %s", s)
	}
	if err != nil {
		return n, err
	}
	for _, d := range []string{"cni/net.d", "cni/ipam", "runc", "kubelet", "pod-logs"} {
		if err := os.MkdirAll(filepath.Join(n.Dir, d), 0o755); err != nil {
			return n, fmt.Errorf("testbed: %w", err)
		}
	}
	if err := n.record(); err != nil {
		return n, err
	}
	return n, n.network()
}

// startNode runs the node newNode prepared. Whatever it started is stopped by Close, also after
// an error.
func (c *Cluster) startNode(ctx context.Context, n *Node, opts NodeOptions, bins NodeBinaries) (err error) {
	defer func() {
		if err != nil {
			err = errors.Join(err, n.Close())
		}
	}()
	if err := n.cgroupRoot(); err != nil {
		return err
	}
	istioCNI := ""
	if opts.Ambient {
		if istioCNI = bins.IstioCNI; istioCNI == "" {
			return errors.New("testbed: NodeOptions.Ambient without Istio CNI's plugin")
		}
		n.ambientDir = ambientRunDirTmpl + strings.TrimPrefix(n.bridge, nodeBridgePrefix)
		if err := n.record(); err != nil { // before anything of the agent's exists
			return err
		}
	}
	if err := n.cniConfig(istioCNI); err != nil {
		return err
	}
	if opts.Ambient {
		if n.ambient, err = startAmbient(ctx, c, n); err != nil {
			return err
		}
	}
	if err := c.controlPlane(ctx, n, bins); err != nil {
		return err
	}
	if err := n.startContainerd(ctx, opts); err != nil {
		return err
	}
	if n.dns, err = startClusterDNS(c.Client, n.IP); err != nil {
		return err
	}
	if err := c.startKubelet(ctx, n, bins); err != nil {
		return err
	}
	if err := c.startKubeProxy(ctx, n, bins); err != nil {
		return err
	}
	return nil
}

// startKubeProxy runs kube-proxy in nftables mode (its own tables, ip and ip6 "kube-proxy",
// which Close deletes), so that ClusterIP Services work (TestNode checks it from the host); no
// conntrack or other sysctl changes, NodePorts only on the node's bridge address. It waits until
// kube-proxy's healthz answers 200 (it has synced its rules once).
func (c *Cluster) startKubeProxy(ctx context.Context, n *Node, bins NodeBinaries) error {
	if err := writeClientCert(c.Dir, "kube-proxy", "system:kube-proxy"); err != nil {
		return err
	}
	if err := c.writeKubeconfig(filepath.Join(n.Dir, "kube-proxy.kubeconfig"), "kube-proxy"); err != nil {
		return err
	}
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	healthz := fmt.Sprintf("127.0.0.1:%d", ports[0])
	cfg := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %q}
mode: nftables
hostnameOverride: %q
clusterCIDR: %q
detectLocalMode: ClusterCIDR
nodePortAddresses: [%q]
healthzBindAddress: %q
metricsBindAddress: "127.0.0.1:%d"
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
`, filepath.Join(n.Dir, "kube-proxy.kubeconfig"), n.Name, n.Subnet, n.IP+"/32", healthz, ports[1])
	if err := writeFile(filepath.Join(n.Dir, "kube-proxy.yaml"), cfg); err != nil {
		return err
	}
	p, err := startProcIn(n.Dir, n.Dir, "kube-proxy", nil, bins.Proxy, "--config", filepath.Join(n.Dir, "kube-proxy.yaml"), "--v=2")
	if err != nil {
		return err
	}
	n.procs = append(n.procs, p)
	if err := c.waitHTTP(ctx, "http://"+healthz+"/healthz", "", p); err != nil {
		return fmt.Errorf("testbed: kube-proxy: %w", err)
	}
	return nil
}

// network creates the CNI bridge with the gateway address before the plugin does: it is the
// node's IP (the kubelet refuses a loopback one), and the host reaches every pod through it.
// The bridge plugin finds it and keeps it.
func (n *Node) network() error {
	if err := ipCmd("link", "add", n.bridge, "type", "bridge"); err != nil {
		return err
	}
	if err := ipCmd("addr", "add", n.IP+"/24", "dev", n.bridge); err != nil {
		return err
	}
	return ipCmd("link", "set", n.bridge, "up")
}

// cniPlugins are the CNI plugins of Debian's containernetworking-plugins the node uses.
var cniPlugins = []string{"bridge", "host-local", "loopback"}

// cniConfig writes the node's conflist (bridge with host-local addresses, loopback, and Istio
// CNI's plugin last when istioCNI is its binary) and its CNI bin directory: links to
// /usr/lib/cni's plugins and to istioCNI.
func (n *Node) cniConfig(istioCNI string) error {
	bin := filepath.Join(n.Dir, "cni/bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	links := map[string]string{}
	for _, p := range cniPlugins {
		links[p] = filepath.Join("/usr/lib/cni", p)
	}
	plugins := []any{
		map[string]any{"type": "bridge", "bridge": n.bridge, "isGateway": true, "ipMasq": false, "hairpinMode": true,
			"ipam": map[string]any{"type": "host-local", "dataDir": filepath.Join(n.Dir, "cni/ipam"),
				"ranges": [][]map[string]string{{{"subnet": n.Subnet, "gateway": n.IP}}}, "routes": []map[string]string{{"dst": "0.0.0.0/0"}}}},
		map[string]any{"type": "loopback"},
	}
	if istioCNI != "" {
		links["istio-cni"] = istioCNI
		cfg, err := istioCNIConfig(n.ambientDir)
		if err != nil {
			return err
		}
		plugins = append(plugins, cfg)
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(bin, name)); err != nil {
			return fmt.Errorf("testbed: %w", err)
		}
	}
	conf, err := json.MarshalIndent(map[string]any{"cniVersion": "1.0.0", "name": "testbed", "plugins": plugins}, "", "  ")
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	return writeFile(filepath.Join(n.Dir, "cni/net.d/10-testbed.conflist"), string(conf)+"\n")
}

// cgroupRoot creates the kubelet's cgroup root in every cgroup v1 hierarchy (the kubelet checks
// that it exists), cpuset's copied from the parent so that tasks may join; or the one v2 group.
func (n *Node) cgroupRoot() error {
	dirs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range dirs {
		d := filepath.Join(h, n.cgroup)
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("testbed: creating cgroup %s: %w", d, err)
		}
		if filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return fmt.Errorf("testbed: %w", err)
				}
				if err := os.WriteFile(filepath.Join(d, f), b, 0o644); err != nil {
					return fmt.Errorf("testbed: %w", err)
				}
			}
		}
	}
	return nil
}

// cgroupHierarchies are the mounted cgroup hierarchies' roots: /sys/fs/cgroup itself on v2, each
// controller's directory (and name=systemd's, and the hybrid unified one) on v1.
func cgroupHierarchies() ([]string, error) {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{"/sys/fs/cgroup"}, nil
	}
	entries, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	var out []string
	for _, e := range entries {
		p := filepath.Join("/sys/fs/cgroup", e.Name())
		if fi, err := os.Lstat(p); err == nil && fi.IsDir() { // cpu,cpuacct style symlinks skipped
			out = append(out, p)
		}
	}
	return out, nil
}

// controlPlane starts kube-controller-manager and kube-scheduler with client certificates of
// the users the bootstrap RBAC policy knows, and binds the system:node role to the node's user
// (there is no Node authorizer: authorization is RBAC only).
func (c *Cluster) controlPlane(ctx context.Context, n *Node, bins NodeBinaries) error {
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "testbed:" + n.Name},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:node"},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: "system:node:" + n.Name}},
	}
	if _, err := c.Client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("testbed: binding system:node for %s: %w", n.Name, err)
	}
	for _, u := range []struct{ name, cn string }{
		{"kube-controller-manager", "system:kube-controller-manager"},
		{"kube-scheduler", "system:kube-scheduler"},
		{"kubelet", "system:node:" + n.Name},
	} {
		var orgs []string
		if u.name == "kubelet" {
			orgs = []string{"system:nodes"}
		}
		if err := writeClientCert(c.Dir, u.name, u.cn, orgs...); err != nil {
			return err
		}
		if err := c.writeKubeconfig(filepath.Join(n.Dir, u.name+".kubeconfig"), u.name); err != nil {
			return err
		}
	}
	f := func(name string) string { return filepath.Join(c.Dir, name) }
	kcm, err := startProcIn(n.Dir, n.Dir, "kube-controller-manager", nil, bins.ControllerManager,
		"--kubeconfig", filepath.Join(n.Dir, "kube-controller-manager.kubeconfig"),
		"--use-service-account-credentials",
		"--service-account-private-key-file", f("sa.key"),
		"--root-ca-file", f("ca.crt"),
		"--leader-elect=false",
		"--secure-port=0")
	if err != nil {
		return err
	}
	n.procs = append(n.procs, kcm)
	sched, err := startProcIn(n.Dir, n.Dir, "kube-scheduler", nil, bins.Scheduler,
		"--kubeconfig", filepath.Join(n.Dir, "kube-scheduler.kubeconfig"),
		"--leader-elect=false",
		"--secure-port=0")
	if err != nil {
		return err
	}
	n.procs = append(n.procs, sched)
	return nil
}

// writeKubeconfig writes a kubeconfig for the API server with the client certificate
// c.Dir/user.crt.
func (c *Cluster) writeKubeconfig(path, user string) error {
	f := func(name string) string { return filepath.Join(c.Dir, name) }
	return writeFile(path, fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster: {server: %q, certificate-authority: %q}
users:
- name: %s
  user: {client-certificate: %q, client-key: %q}
contexts:
- name: testbed
  context: {cluster: testbed, user: %s}
current-context: testbed
`, c.APIServer, f("ca.crt"), user, f(user+".crt"), f(user+".key"), user))
}

// startContainerd runs containerd with its CRI plugin, its root, state, sockets, runc's root and
// the pods' network namespaces under n.Dir, and imports opts.Images into the k8s.io namespace.
func (n *Node) startContainerd(ctx context.Context, opts NodeOptions) error {
	runc, err := exec.LookPath("runc")
	if err != nil {
		return errors.New("testbed: runc not found on PATH: apt-get install runc")
	}
	d := func(name string) string { return filepath.Join(n.Dir, name) }
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[ttrpc]
  address = %q
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # Containers' oom_score_adj no lower than containerd's own: the test may lack
  # CAP_SYS_RESOURCE (then runc's "failed to update /proc/self/oom_score_adj: Permission
  # denied" fails every sandbox).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = %q
        Root = %q
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
    max_conf_num = 1
`, d("root"), d("state"), n.ContainerdSocket, n.ContainerdSocket+".ttrpc", d("opt"), opts.SandboxImage,
		runc, d("runc"), d("cni/bin"), d("cni/net.d"))
	if err := writeFile(d("containerd.toml"), cfg); err != nil {
		return err
	}
	p, err := startProcIn(n.Dir, n.Dir, "containerd", nil, "containerd", "--config", d("containerd.toml"))
	if err != nil {
		return err
	}
	n.procs = append(n.procs, p)
	if err := waitFor(ctx, 30*time.Second, p, func() error { _, err := n.Ctr(ctx, "version"); return err }); err != nil {
		return fmt.Errorf("testbed: containerd not answering on %s: %w", n.ContainerdSocket, err)
	}
	for _, img := range opts.Images {
		if err := n.Import(ctx, img); err != nil {
			return err
		}
	}
	return nil
}

// Import imports an OCI image-layout archive into containerd's k8s.io namespace, unpacked for
// the CRI's snapshotter, where the kubelet finds it.
func (n *Node) Import(ctx context.Context, archive string) error {
	_, err := n.Ctr(ctx, "images", "import", "--snapshotter", "overlayfs", archive)
	return err
}

// Ctr runs `ctr -a SOCKET -n k8s.io ARGS...` (60 s at most) against the node's containerd.
func (n *Node) Ctr(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"-a", n.ContainerdSocket, "-n", "k8s.io"}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = strings.TrimSpace(string(ee.Stderr))
		}
		return out, fmt.Errorf("testbed: ctr %s: %v: %s", strings.Join(args, " "), err, stderr)
	}
	return out, nil
}

// startKubelet writes the kubelet's configuration (cgroup v1 allowed, cgroupfs, no swap check,
// no static pods, its own resolv.conf, eviction thresholds a shared disk does not cross) and runs
// it with its root directory under n.Dir, then waits until the Node is Ready.
func (c *Cluster) startKubelet(ctx context.Context, n *Node, bins NodeBinaries) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	d := func(name string) string { return filepath.Join(n.Dir, name) }
	if err := writeFile(d("resolv.conf"), "nameserver 127.0.0.1\noptions ndots:1\n"); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: %q
containerRuntimeEndpoint: %q
address: %q
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %q}
authorization: {mode: Webhook}
resolvConf: %q
clusterDomain: cluster.local
clusterDNS: [%q]
staticPodPath: ""
podLogsDir: %q
registerNode: true
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
evictionPressureTransitionPeriod: 10s
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
fileCheckFrequency: 10s
`, n.cgroup, "unix://"+n.ContainerdSocket, n.IP, ports[0], ports[1], filepath.Join(c.Dir, "ca.crt"), d("resolv.conf"), n.IP, d("pod-logs"))
	if err := writeFile(d("kubelet.yaml"), cfg); err != nil {
		return err
	}
	n.sysctls = map[string]string{}
	for _, k := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return fmt.Errorf("testbed: %w", err)
		}
		n.sysctls[k] = string(b)
	}
	if err := n.record(); err != nil {
		return err
	}
	p, err := startProcIn(n.Dir, n.Dir, "kubelet", nil, bins.Kubelet,
		"--config", d("kubelet.yaml"),
		"--kubeconfig", d("kubelet.kubeconfig"),
		"--root-dir", d("kubelet"),
		"--cert-dir", d("kubelet/pki"),
		"--hostname-override", n.Name,
		"--node-ip", n.IP,
		"--v=2")
	if err != nil {
		return err
	}
	n.procs = append(n.procs, p)
	var last string
	err = waitFor(ctx, 3*time.Minute, p, func() error {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return err
		}
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				last = fmt.Sprintf("Ready=%s %s: %s", cond.Status, cond.Reason, cond.Message)
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
			}
		}
		return errors.New(last)
	})
	if err != nil {
		return fmt.Errorf("testbed: node %s not Ready (%s): %w", n.Name, last, err)
	}
	return nil
}

// kubeletSysctls are what the kubelet sets when protectKernelDefaults is off (its default).
var kubeletSysctls = []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"}

// waitFor polls ok every 250 ms until it returns nil, p exits, or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, p *proc, ok func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		if err := p.exited(); err != nil {
			return err
		}
		err := ok()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %v: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func writeFile(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	return nil
}
