package testbed

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// recordDir holds one record per running node, so that a later run can remove what a test killed
// with SIGKILL left behind (its Close never ran): the record names the test process and
// everything the node made outside its directory.
const recordDir = "/run/detour-testbed/nodes"

// nodeRecord is what sweepNodes needs to undo a dead run's node.
type nodeRecord struct {
	PID     int               `json:"pid"` // the test process
	Dir     string            `json:"dir"`
	Bridge  string            `json:"bridge"`
	Cgroup  string            `json:"cgroup"`
	Sysctls map[string]string `json:"sysctls,omitempty"`
	// Ambient is Istio CNI's run directory of an ambient node (NodeOptions.Ambient), "" else;
	// Subnet the node's pods' (their entries in Istio CNI's host probe ipset).
	Ambient string `json:"ambient,omitempty"`
	Subnet  string `json:"subnet,omitempty"`
}

// ambientRecord selects the records of ambient nodes: Istio CNI's host rules and probe ipset are
// the machine's, shared by every ambient node on it.
func ambientRecord(r nodeRecord) bool { return r.Ambient != "" }

// anyRecord selects every record: the kubelet's chains and kube-proxy's tables are shared by
// every node.
func anyRecord(nodeRecord) bool { return true }

// lockNode takes the machine's node lock, waiting while another test process (another test
// package of the same `go test ./...`) runs a node: two nodes on one machine share the kubelet's
// iptables chains and kube-proxy's nftables table, and one kube-proxy's sync erases the other's
// ClusterIPs. The lock goes with the process, so a SIGKILLed run never holds it.
func lockNode(logf func(string, ...any)) (func(), error) {
	if err := os.MkdirAll(recordDir, 0o755); err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	path := filepath.Join(filepath.Dir(recordDir), "node.lock") // beside the records, not among them
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		logf("testbed: another node runs on this machine; waiting for it to stop (%s)", path)
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("testbed: locking %s: %w", path, err)
		}
	}
	return func() { f.Close() }, nil
}

func (n *Node) recordPath() string { return filepath.Join(recordDir, filepath.Base(n.cgroup)+".json") }

// record writes (or rewrites, once the kubelet's sysctls are known) the node's record.
func (n *Node) record() error {
	if err := os.MkdirAll(recordDir, 0o755); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	b, err := json.Marshal(nodeRecord{PID: os.Getpid(), Dir: n.Dir, Bridge: n.bridge, Cgroup: n.cgroup, Sysctls: n.sysctls, Ambient: n.ambientDir, Subnet: n.Subnet})
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	return writeFile(n.recordPath(), string(b))
}

// sweepNodes undoes the nodes of test processes that are gone: their processes (found by the
// node directory on their command line, containerd's shims included, and in the cgroup root),
// mounts, cgroups, bridge, kube-proxy's tables and the kubelet's chains and kernel settings.
// It returns what it swept, for the log.
func sweepNodes() ([]string, error) {
	entries, err := os.ReadDir(recordDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("testbed: %w", err)
	}
	var swept []string
	var errs []error
	for _, e := range entries {
		path := filepath.Join(recordDir, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("testbed: %w", err))
			continue
		}
		var r nodeRecord
		if err := json.Unmarshal(b, &r); err != nil || r.Cgroup == "" || r.Dir == "" {
			errs = append(errs, fmt.Errorf("testbed: unreadable node record %s: %v", path, err))
			continue
		}
		if syscall.Kill(r.PID, 0) == nil {
			continue // its test is still running
		}
		killUnder(r.Dir, r.Cgroup)
		n := &Node{Dir: r.Dir, bridge: r.Bridge, cgroup: r.Cgroup, sysctls: r.Sysctls}
		errs = append(errs, n.restoreSysctls(), UnmountUnder(r.Dir), n.removeCgroups(), n.removeBridge())
		if !othersAlive(path, anyRecord) {
			errs = append(errs, removeKubeProxyTables(), removeKubeletChains())
		}
		if r.Ambient != "" {
			errs = append(errs, sweepAmbientHost(r.Subnet, !othersAlive(path, ambientRecord)), os.RemoveAll(r.Ambient))
		}
		errs = append(errs, os.RemoveAll(r.Dir), os.Remove(path))
		swept = append(swept, fmt.Sprintf("node %s of process %d", filepath.Base(r.Cgroup), r.PID))
	}
	return swept, errors.Join(errs...)
}

// killUnder SIGKILLs every process whose command line names dir (containerd, its shims, the
// kubelet) or that is in the cgroup root (the pods' processes).
func killUnder(dir, cgroup string) {
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		cg, _ := os.ReadFile("/proc/" + p.Name() + "/cgroup")
		if strings.Contains(string(cmdline), dir) || strings.Contains(string(cg), ":"+cgroup+"/") {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// othersAlive reports whether a node record other than except that which selects belongs to a
// running process.
func othersAlive(except string, which func(nodeRecord) bool) bool {
	entries, _ := os.ReadDir(recordDir)
	for _, e := range entries {
		path := filepath.Join(recordDir, e.Name())
		if path == except {
			continue
		}
		var r nodeRecord
		if b, err := os.ReadFile(path); err == nil && json.Unmarshal(b, &r) == nil && which(r) && syscall.Kill(r.PID, 0) == nil {
			return true
		}
	}
	return false
}
