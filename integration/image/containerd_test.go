package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/integration/testbed"
)

// ctrNamespace is the containerd namespace the test's images and containers live in.
const ctrNamespace = "detour-test"

// The image as a node runs it (issue 18, point 2): Debian's containerd, started by the test with
// its own root, state, socket and config under a temporary directory, imports the archive
// TestImageArchive checks and runs it with runc in a network-namespace pod; the waypoint inside
// (the image's entrypoint, `waypoint --config` from a read-only mount, static discovery, a dev CA
// identity) answers its health listener's /healthz and /readyz from another pod, runs as the
// image's nonroot user, and carries a ztunnel-style HBONE CONNECT from a client pod to Istio's Go
// HBONE server in a third pod, which delivers it to an echo there.
func TestContainerd(t *testing.T) {
	for _, bin := range []string{"containerd", "ctr", "runc"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("image: skipping: no %s on PATH (apt-get install containerd runc)", bin)
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("image: skipping: containerd and network namespaces need root")
	}
	network := testbed.NewNetwork(t)
	wp := network.Pod(t, nil, "demo", "detour", "detour")
	client := network.Pod(t, nil, "demo", "client", "client")
	echo := network.Pod(t, nil, "demo", "echo", "echo")

	archive, _ := sharedArchive(t)
	dir := t.TempDir()
	tarPath := filepath.Join(dir, "detour.tar")
	if err := os.WriteFile(tarPath, archive, 0o644); err != nil {
		t.Fatal(err)
	}
	ctd := startContainerd(t, filepath.Join(dir, "containerd"))
	ref := Ref(testOptions.Version)

	// The snapshotter: overlayfs as on any node, native where this machine cannot mount overlays.
	// A first container that only prints the version proves the import and the runtime.
	var snapshotter string
	for _, s := range []string{"overlayfs", "native"} {
		imported := time.Now()
		if _, err := ctd.ctr(t, "images", "import", "--snapshotter", s, tarPath); err != nil {
			t.Logf("image: snapshotter %s: %v", s, err)
			continue
		}
		t.Logf("image: imported %s (%d bytes) with the %s snapshotter in %v", ref, len(archive), s, time.Since(imported).Round(time.Millisecond))
		t.Cleanup(func() { ctd.remove(t, "version-"+s) }) // --rm already did, unless it failed
		args := append(append([]string{"run", "--rm"}, ctd.runArgs(s, "version-"+s, wp)...), ref, "version-"+s, Entrypoint, "version")
		out, err := ctd.ctr(t, args...)
		if err != nil {
			t.Logf("image: snapshotter %s: %v", s, err)
			continue
		}
		if got := strings.TrimSpace(string(out)); got != "detour "+testOptions.Version {
			t.Fatalf("image: `detour version` in the container said %q, want %q", got, "detour "+testOptions.Version)
		}
		snapshotter = s
		break
	}
	if snapshotter == "" {
		t.Fatalf("image: containerd ran the image with no snapshotter (overlayfs, native); containerd's log:\n%s", ctd.tail())
	}
	t.Logf("image: containerd %s runs the image with the %s snapshotter", ctd.version(t), snapshotter)

	// The waypoint's configuration and dev CA, readable by the image's nonroot user.
	conf := filepath.Join(dir, "etc-detour")
	ca, err := devca.Init(filepath.Join(conf, "ca"), "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	const waypointID, vip = "spiffe://cluster.local/ns/demo/sa/detour", "10.96.0.50"
	cfg := fmt.Sprintf(`identity: {source: devca, devca: {dir: /etc/detour/ca, id: %q}}
listeners: {hbone: "0.0.0.0:15008", health: "0.0.0.0:15021", tunnel: "off"}
waypoint: {namespace: demo, gateway: detour}
discovery:
  static:
    services:
    - name: echo
      namespace: demo
      vips: [%s]
      ports: [{name: tcp, port: 80, targetPort: 8080}]
      endpoints: [{ip: %s, serviceAccount: echo}]
`, waypointID, vip, echo.IP)
	if err := os.WriteFile(filepath.Join(conf, "waypoint.yaml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := chownAll(conf, 65532); err != nil {
		t.Fatal(err)
	}

	// The echo pod: Istio's Go HBONE server on 15008 (standing in for its ztunnel's inbound) in
	// front of an echo that greets first.
	echoID := workload(t, ca, "demo", "echo")
	echo.Run(t, echo.IP+":8080", "echo", echo.IP+":8080", "hello from the echo pod")
	echo.RunIstioHBONE(t, echoID)

	// The waypoint container: the image's entrypoint with `waypoint --config`, as the chart's
	// pod spec runs it (ctr replaces the process's arguments, so the entrypoint comes first).
	logPath := filepath.Join(dir, "waypoint.log")
	id := "waypoint"
	t.Cleanup(func() { ctd.remove(t, id) })
	start := time.Now()
	args := append(append([]string{"run", "--detach", "--log-uri", "file://" + logPath}, ctd.runArgs(snapshotter, id, wp)...),
		"--mount", "type=bind,src="+conf+",dst=/etc/detour,options=rbind:ro", ref, id, Entrypoint, "waypoint", "--config", "/etc/detour/waypoint.yaml")
	if _, err := ctd.ctr(t, args...); err != nil {
		t.Fatalf("image: %v; containerd's log:\n%s", err, ctd.tail())
	}
	containerLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the waypoint container's output:\n%s", containerLog())
		}
	})

	// Ready, as a kubelet's probe sees it: from outside the container, on the pod's address.
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: client.DialContext}}
	defer hc.CloseIdleConnections()
	var last string
	for deadline := time.Now().Add(60 * time.Second); ; {
		code, body, err := get(hc, "http://"+wp.IP+":15021/readyz")
		if err == nil && code == http.StatusOK {
			break
		}
		last = fmt.Sprintf("%d %q %v", code, body, err)
		if time.Now().After(deadline) {
			t.Fatalf("image: the containerized waypoint's /readyz on %s:15021 not 200 after 60 s (last: %s); its output:\n%s\ncontainerd's log:\n%s",
				wp.IP, last, containerLog(), ctd.tail())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("image: /readyz answered 200 %v after `ctr run` started", time.Since(start).Round(time.Millisecond))
	if code, body, err := get(hc, "http://"+wp.IP+":15021/healthz"); err != nil || code != http.StatusOK {
		t.Errorf("image: /healthz: %d %q %v", code, body, err)
	}

	// It runs as the image's user, not as root.
	if uid := ctd.taskUID(t, id); uid != "65532" {
		t.Errorf("image: the waypoint's process runs as uid %s, want 65532 (the image's user %s)", uid, User)
	}

	// HBONE through the container: a ztunnel-style CONNECT to the service's VIP reaches the echo
	// pod through detour.
	z := testbed.NewZtunnel(workload(t, ca, "demo", "client"), client.DialContext)
	defer z.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := z.Dial(ctx, wp.IP+":15008", waypointID, vip+":80", netip.MustParseAddrPort(client.IP+":41234"))
	if err != nil {
		t.Fatalf("image: HBONE CONNECT to %s:80 through the containerized waypoint: %v", vip, err)
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(s)
	if greeting, err := r.ReadString('\n'); err != nil || greeting != "hello from the echo pod\n" {
		t.Fatalf("image: through the waypoint: greeting %q, %v", greeting, err)
	}
	msg := "ping through containerd\n"
	if _, err := io.WriteString(s, msg); err != nil {
		t.Fatal(err)
	}
	if got, err := r.ReadString('\n'); err != nil || got != msg {
		t.Fatalf("image: echoed %q, %v; want %q", got, err, msg)
	}
}

// workload is a dev CA certificate for ns/sa, as the test bed's pods use it.
func workload(t *testing.T, ca *devca.CA, ns, sa string) *testbed.Workload {
	t.Helper()
	svid, err := ca.Issue("spiffe://cluster.local/ns/"+ns+"/sa/"+sa, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return &testbed.Workload{Namespace: ns, ServiceAccount: sa, SVID: svid, Bundle: ca.Bundle()}
}

func get(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

func chownAll(dir string, uid int) error {
	return filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, uid, uid)
	})
}

// containerd is a containerd process of the test's own: root, state, sockets, runc's root and
// the FIFOs all under dir, never the machine's service.
type containerd struct {
	dir, sock, fifos, runc, log string
	cgroup                      string // the parent of the containers' cgroups, e.g. /detour-test-1a2b3c
	cmd                         *exec.Cmd
	done                        chan struct{}
}

// startContainerd starts containerd in dir and waits (30 s at most) until it answers. When the
// test ends it is stopped (SIGTERM, SIGKILL after 10 s) and every mount left under dir is
// unmounted, so that the temporary directory can be removed.
func startContainerd(t *testing.T, dir string) *containerd {
	t.Helper()
	c := &containerd{dir: dir, sock: filepath.Join(dir, "containerd.sock"), fifos: filepath.Join(dir, "fifo"),
		runc: filepath.Join(dir, "runc"), log: filepath.Join(dir, "containerd.log"), done: make(chan struct{})}
	rnd := make([]byte, 3)
	rand.Read(rnd)
	c.cgroup = "/" + ctrNamespace + "-" + hex.EncodeToString(rnd)
	for _, d := range []string{c.fifos, c.runc} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// The CRI plugin is off (no kubelet yet); the opt plugin's directory is ours too.
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
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
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.sock, c.sock+".ttrpc", filepath.Join(dir, "opt"))
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(c.log)
	if err != nil {
		t.Fatal(err)
	}
	c.cmd = exec.Command("containerd", "--config", cfgPath)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("image: starting containerd: %v", err)
	}
	go func() { c.cmd.Wait(); logf.Close(); close(c.done) }()
	t.Cleanup(func() {
		c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			t.Errorf("image: containerd did not stop within 10 s of SIGTERM; killed. Its log:\n%s", c.tail())
			c.cmd.Process.Kill()
			<-c.done
		}
		if t.Failed() {
			t.Logf("containerd's log:\n%s", c.tail())
		}
		unmountUnder(t, dir)
		removeCgroups(t, c.cgroup)
	})
	for deadline := time.Now().Add(30 * time.Second); ; {
		select {
		case <-c.done:
			t.Fatalf("image: containerd exited at start (%v); its log:\n%s", c.cmd.ProcessState, c.tail())
		default:
		}
		if _, err := c.ctr(t, "version"); err == nil {
			return c
		} else if time.Now().After(deadline) {
			t.Fatalf("image: containerd not answering on %s after 30 s: %v; its log:\n%s", c.sock, err, c.tail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ctr runs `ctr -a SOCK -n detour-test ARGS...` (60 s at most) and returns its standard output;
// an error says the command, its exit and its output.
func (c *containerd) ctr(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"-a", c.sock, "-n", ctrNamespace}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("ctr %s: %v: %s%s", strings.Join(args, " "), err,
			strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// version is the server's version as ctr reports it.
func (c *containerd) version(t *testing.T) string {
	out, err := c.ctr(t, "version")
	if err != nil {
		return "unknown"
	}
	if m := regexp.MustCompile(`(?s)Server:.*?Version:\s*(\S+)`).FindSubmatch(out); m != nil {
		return string(m[1])
	}
	return "unknown"
}

// taskUID is the real uid of container id's process, from /proc.
func (c *containerd) taskUID(t *testing.T, id string) string {
	t.Helper()
	out, err := c.ctr(t, "tasks", "ls")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			status, err := os.ReadFile("/proc/" + f[1] + "/status")
			if err != nil {
				t.Fatal(err)
			}
			if m := regexp.MustCompile(`(?m)^Uid:\s+(\d+)`).FindSubmatch(status); m != nil {
				return string(m[1])
			}
		}
	}
	t.Fatalf("image: no task %s in `ctr tasks ls`:\n%s", id, out)
	return ""
}

// remove kills container id's task, deletes it and the container (and with it its snapshot),
// each step bounded; a failure is an error of the test with containerd's log.
func (c *containerd) remove(t *testing.T, id string) {
	t.Helper()
	c.ctr(t, "tasks", "kill", "--signal", "SIGKILL", id) // already gone is fine
	var err error
	for deadline := time.Now().Add(20 * time.Second); ; {
		if _, err = c.ctr(t, "tasks", "delete", "--force", id); err == nil || strings.Contains(err.Error(), "not found") {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("image: deleting task %s: %v; containerd's log:\n%s", id, err, c.tail())
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, err := c.ctr(t, "containers", "delete", id); err != nil && !strings.Contains(err.Error(), "not found") {
		t.Errorf("image: deleting container %s: %v; containerd's log:\n%s", id, err, c.tail())
	}
}

// runArgs are the `ctr run` flags every container of the test gets: its snapshotter, the FIFOs,
// runc's root and the cgroup under the test's own directories, the pod's network namespace.
func (c *containerd) runArgs(snapshotter, id string, pod *testbed.Pod) []string {
	return []string{"--snapshotter", snapshotter, "--fifo-dir", c.fifos, "--runc-root", c.runc,
		"--cgroup", c.cgroup + "/" + id, "--with-ns", "network:" + pod.NetnsPath()}
}

// removeCgroups removes the containers' parent cgroup in every hierarchy (cgroup v1 has one per
// controller; v2 one), after runc removed the containers' own: `ctr run` creates the parent and
// nothing removes it.
func removeCgroups(t *testing.T, parent string) {
	t.Helper()
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*" + parent)
	if _, err := os.Stat("/sys/fs/cgroup" + parent); err == nil {
		dirs = append(dirs, "/sys/fs/cgroup"+parent)
	}
	for _, d := range dirs {
		if err := os.Remove(d); err != nil {
			t.Errorf("image: removing cgroup %s: %v", d, err)
		}
	}
}

// tail is the last 30 lines of containerd's log.
func (c *containerd) tail() string {
	b, _ := os.ReadFile(c.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

// unmountUnder unmounts (lazily, deepest first) every mount point under dir: a shim killed
// before it cleaned up leaves the container's rootfs mounted, and then the temporary directory
// cannot be removed. A mount left behind is reported.
func unmountUnder(t *testing.T, dir string) {
	t.Helper()
	points, err := testbed.MountsUnder(dir)
	if err != nil {
		t.Error(err)
		return
	}
	for _, mp := range points {
		t.Logf("image: unmounting %s, left mounted after containerd stopped", mp)
	}
	if err := testbed.UnmountUnder(dir); err != nil {
		t.Errorf("image: %v", err)
	}
}
