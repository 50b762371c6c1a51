package testbed

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Network is a Linux bridge that pod network namespaces attach to through veth pairs, with
// addresses in a /24 of 10.244.0.0/16. The root namespace has no address on it: pods reach only
// each other. Everything is removed when the test ends.
type Network struct {
	id     string // random, names the bridge and the namespaces
	bridge string
	subnet string // "10.244.N"
	mu     sync.Mutex
	next   int
}

// NewNetwork creates the bridge, or skips the test, saying why, when this machine cannot create
// network namespaces (not root, no ip command).
func NewNetwork(t testing.TB) *Network {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("testbed: skipping: no ip command (install iproute2) to create network namespaces")
	}
	b := make([]byte, 3)
	rand.Read(b)
	n := &Network{id: hex.EncodeToString(b), next: 2}
	n.bridge = "dtb" + n.id
	n.subnet = fmt.Sprintf("10.244.%d", 1+int(b[0])%250)
	probe := "dtprobe" + n.id
	if out, err := exec.Command("ip", "netns", "add", probe).CombinedOutput(); err != nil {
		t.Skipf("testbed: skipping: this machine cannot create network namespaces: %v: %s", err, strings.TrimSpace(string(out)))
	}
	_ = exec.Command("ip", "netns", "del", probe).Run()
	if err := ipCmd("link", "add", n.bridge, "type", "bridge"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ipCmd("link", "del", n.bridge); err != nil {
			t.Error(err)
		}
	})
	if err := ipCmd("link", "set", n.bridge, "up"); err != nil {
		t.Fatal(err)
	}
	// A safety net: should anything in the root namespace address a pod, the packets are dropped
	// here instead of leaving the machine by the default route.
	if err := ipCmd("route", "add", "blackhole", n.subnet+".0/24"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ipCmd("route", "del", "blackhole", n.subnet+".0/24"); err != nil {
			t.Error(err)
		}
	})
	return n
}

// Node gives the root network namespace an address on the bridge (SUBNET.1), as a node reaches
// the pods it runs: processes outside any pod (waypoint replicas on loopback, say) can then dial
// pods, and pods answer them. The subnet's blackhole route makes way for the bridge's own route
// (packets to pods still never leave the machine) and is back when the test ends.
func (n *Network) Node(t testing.TB) {
	t.Helper()
	if err := ipCmd("route", "del", "blackhole", n.subnet+".0/24"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ipCmd("route", "add", "blackhole", n.subnet+".0/24"); err != nil {
			t.Error(err)
		}
	})
	if err := ipCmd("addr", "add", n.subnet+".1/24", "dev", n.bridge); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ipCmd("addr", "del", n.subnet+".1/24", "dev", n.bridge); err != nil {
			t.Error(err)
		}
	})
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("testbed: ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Pod is a pod's network namespace: one the test bed made (Network.Pod, a namespace named under
// /var/run/netns with one interface on the Network) or one a runtime made (PodAt: the node's
// containerd, as its CNI ADD names it).
type Pod struct {
	Name, Namespace, ServiceAccount string
	IP                              string
	netns                           string // the name under /var/run/netns, "" for PodAt's
	nsPath                          string // the namespace's file
}

// PodAt is the pod ns/name (service account sa, address ip) whose network namespace is the file
// nsPath, e.g. a network namespace containerd made and named in a CNI ADD. The test bed neither
// made it nor removes it.
func PodAt(nsPath, ns, name, sa, ip string) *Pod {
	return &Pod{Name: name, Namespace: ns, ServiceAccount: sa, IP: ip, nsPath: nsPath}
}

// Pod creates a network namespace for ns/name with the next address, and, when c is not nil, the
// Pod object with that IP in its status, Running and Ready (there is no kubelet to do it).
func (n *Network) Pod(t testing.TB, c *Cluster, ns, name, sa string) *Pod {
	t.Helper()
	n.mu.Lock()
	idx := n.next
	n.next++
	n.mu.Unlock()
	p := &Pod{Name: name, Namespace: ns, ServiceAccount: sa, IP: fmt.Sprintf("%s.%d", n.subnet, idx), netns: fmt.Sprintf("dt%s-%d", n.id, idx)}
	p.nsPath = "/var/run/netns/" + p.netns
	veth := fmt.Sprintf("dtv%s%d", n.id, idx)
	if err := ipCmd("netns", "add", p.netns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ipCmd("netns", "del", p.netns); err != nil {
			t.Error(err)
		}
	})
	steps := [][]string{
		{"link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", p.netns},
		{"link", "set", veth, "master", n.bridge, "up"},
		{"-n", p.netns, "addr", "add", p.IP + "/24", "dev", "eth0"},
		{"-n", p.netns, "link", "set", "eth0", "up"},
		{"-n", p.netns, "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if err := ipCmd(s...); err != nil {
			t.Fatal(err)
		}
	}
	if c != nil {
		if err := c.podObject(context.Background(), p); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func (c *Cluster) podObject(ctx context.Context, p *Pod) error {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: map[string]string{"app": p.Name}},
		Spec: corev1.PodSpec{
			ServiceAccountName: p.ServiceAccount,
			NodeName:           "testbed",
			Containers:         []corev1.Container{{Name: "app", Image: "testbed.invalid/none"}},
		},
	}
	created, err := c.Client.CoreV1().Pods(p.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("testbed: creating pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	now := metav1.Now()
	created.Status = corev1.PodStatus{
		Phase:  corev1.PodRunning,
		PodIP:  p.IP,
		PodIPs: []corev1.PodIP{{IP: p.IP}},
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
	}
	if _, err := c.Client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("testbed: setting status of pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// Do runs fn with the calling thread in the pod's network namespace. Sockets created inside stay
// in that namespace for good, so a listener or a dialled connection made in fn can be used from
// any goroutine afterwards.
func (p *Pod) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Until Setns succeeds the thread is still in the test's namespace: unlock it on those
		// errors rather than let it die with the goroutine. A thread that dies sends the
		// Pdeathsig (SIGKILL) of every process started from it (startProc), whatever goroutine
		// started them: that killed pods' in-test processes one failed Do after they started.
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("testbed: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open(p.nsPath)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("testbed: %w", err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread() // a failed setns leaves the thread where it was
			errc <- fmt.Errorf("testbed: entering %s: %w", p.nsPath, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked and dies with this goroutine: never reused in the wrong
			// namespace.
			errc <- errors.Join(ferr, fmt.Errorf("testbed: leaving %s: %w", p.nsPath, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a TCP listener on addr inside the pod.
func (p *Pod) Listen(addr string) (net.Listener, error) {
	var l net.Listener
	err := p.Do(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	})
	return l, err
}

// DialContext dials from inside the pod.
func (p *Pod) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := p.Do(func() (err error) {
		c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// NetnsPath is the pod's network namespace as a file, for a runtime that joins it (e.g. `ctr run
// --with-ns network:PATH`).
func (p *Pod) NetnsPath() string { return p.nsPath }

// Command is name with args run inside the pod's network namespace (ip netns exec for the test
// bed's own namespaces, nsenter --net for PodAt's).
func (p *Pod) Command(name string, args ...string) *exec.Cmd {
	if p.netns == "" {
		return exec.Command("nsenter", append([]string{"--net=" + p.nsPath, "--", name}, args...)...)
	}
	return exec.Command("ip", append([]string{"netns", "exec", p.netns, name}, args...)...)
}
