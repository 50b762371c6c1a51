package testbed

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// kubernetesServiceIP is the kubernetes Service's ClusterIP: the first of the service range.
const kubernetesServiceIP = "10.96.0.1"

// AdminToken is the bearer token of the test bed's cluster admin (system:masters).
const AdminToken = "detour-testbed-admin"

// Cluster is a running control plane. Fields are immutable after Start.
type Cluster struct {
	Dir        string       // temporary directory with configs, certificates and logs
	Kubeconfig string       // path of an admin kubeconfig
	REST       *rest.Config // admin client config
	Client     kubernetes.Interface
	APIServer  string // https://127.0.0.1:port, or https://NODE-IP:port with a node
	Istiod     *Istiod
	Node       *Node // with Options.Node

	procs []*proc
	logf  func(string, ...any)
}

// Options choose what Start runs. The zero value runs etcd and kube-apiserver only.
type Options struct {
	Istiod bool // also apply the Gateway API and Istio CRDs and start istiod
	// Node also runs a real node (kubelet, containerd's CRI, CNI) with kube-controller-manager
	// and kube-scheduler, and turns the API server's ServiceAccount admission on. Pods then need
	// their ServiceAccount to exist (the controller-manager creates "default" in every namespace)
	// and hand-made Pod objects (Network.Pod) bound to no real node are garbage-collected.
	Node *NodeOptions
}

// Start runs a control plane for the test and stops it (every process, the directory) when the
// test ends, also when it fails. Each phase's duration is logged.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	phase := time.Now()
	bins, err := ensureBinaries(ctx, t.Logf, opts.Istiod)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("testbed: binaries ready in %v", time.Since(phase).Round(time.Millisecond))
	c := &Cluster{Dir: t.TempDir(), logf: t.Logf}
	t.Cleanup(func() {
		if err := c.stop(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			for _, p := range c.procs {
				t.Logf("--- %s log (tail) ---\n%s", p.name, p.tail())
			}
		}
	})
	var node *Node
	if opts.Node != nil {
		node = newTestNode(t, c)
		c.Node = node // istiod serves its CA on the node's IP
	}
	phase = time.Now()
	if err := c.startKube(ctx, bins, node); err != nil {
		t.Fatal(err)
	}
	t.Logf("testbed: etcd and kube-apiserver ready in %v", time.Since(phase).Round(time.Millisecond))
	if opts.Istiod {
		phase = time.Now()
		if err := c.applyCRDs(ctx); err != nil {
			t.Fatal(err)
		}
		t.Logf("testbed: CRDs established in %v", time.Since(phase).Round(time.Millisecond))
		phase = time.Now()
		if err := c.startIstiod(ctx, bins); err != nil {
			t.Fatal(err)
		}
		t.Logf("testbed: istiod ready in %v", time.Since(phase).Round(time.Millisecond))
	}
	if node != nil {
		startNode(t, ctx, c, node, *opts.Node)
	}
	return c
}

// newTestNode prepares the node (its bridge and address, which the API server serves on) and
// closes it when the test ends, after printing its processes' logs if the test failed.
func newTestNode(t testing.TB, c *Cluster) *Node {
	t.Helper()
	n, err := newNode(c)
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range n.procs {
				t.Logf("--- %s log (tail) ---\n%s", p.name, p.tail())
			}
			n.logAmbient(t.Logf)
		}
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// startNode builds (first run only) and starts the node's processes.
func startNode(t testing.TB, ctx context.Context, c *Cluster, n *Node, opts NodeOptions) {
	t.Helper()
	phase := time.Now()
	bins, err := EnsureNodeBinaries(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Ambient {
		if bins.IstioCNI, err = IstioCNI(ctx, t.Logf); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("testbed: node binaries ready in %v", time.Since(phase).Round(time.Millisecond))
	phase = time.Now()
	if err := c.startNode(ctx, n, opts, bins); err != nil {
		t.Fatal(err)
	}
	t.Logf("testbed: node %s Ready in %v", n.Name, time.Since(phase).Round(time.Millisecond))
}

func (c *Cluster) stop() error {
	var errs []error
	for i := len(c.procs) - 1; i >= 0; i-- {
		errs = append(errs, c.procs[i].stop(10*time.Second))
	}
	return errors.Join(errs...)
}

// startKube runs etcd and kube-apiserver. Without a node the API server serves on loopback
// only. With one it serves on the node's IP instead (the CNI bridge's gateway, an address of this
// machine on a bridge that leaves nowhere), advertises it, and its endpoint reconciler gives the
// kubernetes Service (10.96.0.1:443) that endpoint, which kube-proxy serves to the pods; its
// certificate also names that address and the Service's ClusterIP.
func (c *Cluster) startKube(ctx context.Context, bins Binaries, n *Node) error {
	node := n != nil
	host, reconciler := "127.0.0.1", "none"
	if node {
		host, reconciler = n.IP, "lease"
	}
	if err := writeServingPKI(c.Dir, host, kubernetesServiceIP); err != nil {
		return err
	}
	// The API server's client of the kubelets (logs, exec, port-forward).
	if err := writeClientCert(c.Dir, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"); err != nil {
		return err
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]
	etcd, err := startProc(c.Dir, "etcd", nil, bins.Etcd,
		"--data-dir", filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls", "http://127.0.0.1:"+strconv.Itoa(etcdClient),
		"--advertise-client-urls", "http://127.0.0.1:"+strconv.Itoa(etcdClient),
		"--listen-peer-urls", "http://127.0.0.1:"+strconv.Itoa(etcdPeer),
		"--initial-advertise-peer-urls", "http://127.0.0.1:"+strconv.Itoa(etcdPeer),
		"--initial-cluster", "default=http://127.0.0.1:"+strconv.Itoa(etcdPeer),
		"--quota-backend-bytes", strconv.Itoa(2<<30),
		"--unsafe-no-fsync")
	if err != nil {
		return err
	}
	c.procs = append(c.procs, etcd)
	tokens := filepath.Join(c.Dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(AdminToken+",admin,admin,system:masters\n"), 0o600); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	f := func(n string) string { return filepath.Join(c.Dir, n) }
	// Without a node no controller-manager creates default service accounts: the admission
	// plugin that needs them is off and tests create the accounts they use. With one, it is on,
	// and it adds each pod's projected ServiceAccount token volume.
	admission := []string{"--disable-admission-plugins", "ServiceAccount"}
	if node {
		admission = []string{"--enable-admission-plugins", "ServiceAccount"}
	}
	api, err := startProc(c.Dir, "kube-apiserver", nil, bins.KubeAPIServer, append(admission,
		"--etcd-servers", "http://127.0.0.1:"+strconv.Itoa(etcdClient),
		"--bind-address", host,
		"--advertise-address", host,
		"--secure-port", strconv.Itoa(apiPort),
		"--cert-dir", f("apiserver-certs"),
		"--tls-cert-file", f("serving.crt"),
		"--tls-private-key-file", f("serving.key"),
		"--client-ca-file", f("ca.crt"),
		"--token-auth-file", tokens,
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", f("sa.pub"),
		"--service-account-signing-key-file", f("sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--allow-privileged",
		// Without a node the only address is loopback, which the endpoint reconciler refuses
		// for the kubernetes Service, and nothing needs that Service's endpoints.
		"--endpoint-reconciler-type", reconciler,
		// The node's name resolves nowhere: the API server dials kubelets at their address.
		"--kubelet-preferred-address-types", "InternalIP",
		"--kubelet-client-certificate", f("apiserver-kubelet-client.crt"),
		"--kubelet-client-key", f("apiserver-kubelet-client.key"),
		"--enable-priority-and-fairness=false",
		"--profiling=false")...)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, api)
	c.APIServer = "https://" + net.JoinHostPort(host, strconv.Itoa(apiPort))
	ca, err := os.ReadFile(f("ca.crt"))
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	c.REST = &rest.Config{Host: c.APIServer, BearerToken: AdminToken, TLSClientConfig: rest.TLSClientConfig{CAData: ca}, QPS: 200, Burst: 400}
	if err := c.waitHTTP(ctx, c.APIServer+"/readyz", AdminToken, api, etcd); err != nil {
		return err
	}
	c.Client, err = kubernetes.NewForConfig(c.REST)
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	c.Kubeconfig = f("kubeconfig")
	return os.WriteFile(c.Kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {token: %q}
contexts:
- name: testbed
  context: {cluster: testbed, user: admin}
current-context: testbed
`, c.APIServer, f("ca.crt"), AdminToken)), 0o600)
}

// waitHTTP polls url until it answers 200, failing early if a watched process exits.
func (c *Cluster) waitHTTP(ctx context.Context, url, token string, watch ...*proc) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(3 * time.Minute)
	var last string
	for time.Now().Before(deadline) {
		for _, p := range watch {
			if err := p.exited(); err != nil {
				return err
			}
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	return fmt.Errorf("testbed: %s not ready after 3m (last: %s)", url, last)
}

// freePorts returns n distinct free loopback TCP ports.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("testbed: finding a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
