package node

import (
	"bytes"
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/detour-mesh/detour/cmd/detour/cli"
	"github.com/detour-mesh/detour/integration/image"
	"github.com/detour-mesh/detour/integration/testbed"
)

// TestPortForward is issue 18, acceptance 2. An ambient namespace (the node runs Istio's CNI
// plugin; each app pod's inbound and outbound are the test bed's in-pod ztunnel stand-in, routed
// by istiod's workload xDS alone) with detour installed and bound to it. The developer's `detour
// steal svc/shop --port-forward shop`, the CLI's own code run from this process, reaches detour's
// pod only through the API server's port-forward to the kubelet, with an identity from istiod's
// CA. The client pod's app GETs the shop service's ClusterIP: the request matching the steal's
// filter reaches the developer's handler, the others the real pod (its hostname). Then `detour
// run --target svc/envapp` writes the environment it gives CMD, and it is the envapp pod's real
// one (read by exec of `podapp env`), the kubelet's variables (service links, ConfigMap, Secret,
// envFrom with a prefix, fieldRefs, resources, $(VAR) expansion) all of it; only the runtime's own
// (PATH, HOSTNAME, HOME) are not there.
func TestPortForward(t *testing.T) {
	skipUnlessNode(t)
	const ns = "shop"
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	pause, app, ref, detourTar := nodeImages(t, ctx)
	archives := writeArchives(t, t.TempDir(), map[string][]byte{"pause.tar": pause, "podapp.tar": app, "detour.tar": detourTar})
	c := testbed.Start(t, testbed.Options{Istiod: true, Node: &testbed.NodeOptions{Images: archives, SandboxImage: image.PauseRef, Ambient: true}})
	if err := c.Namespace(ctx, ns, map[string]string{"istio.io/dataplane-mode": "ambient"}); err != nil {
		t.Fatal(err)
	}
	logDetourOnFailure(t, c, ns)
	installDetour(t, ctx, c, ns, ref)
	grantSteal(t, ctx, c, ns)
	deploy(t, ctx, c, ns, "shop", image.PodAppRef, nil)
	deploy(t, ctx, c, ns, "client", image.PodAppRef, nil)
	shop := runningPod(t, ctx, c, ns, "shop")
	client := runningPod(t, ctx, c, ns, "client")
	checkEnrolled(t, ctx, c, ns, "shop", "client")

	// The developer: an identity from istiod's CA for dev/alice (a TokenRequest through the
	// kubeconfig), a local handler, the steal through the port-forward.
	if err := c.Namespace(ctx, "dev", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ServiceAccountToken(ctx, "dev", "alice", "istio-ca"); err != nil {
		t.Fatal(err)
	}
	rootFile := filepath.Join(t.TempDir(), "root.pem")
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Istiod.Root.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	as := []string{"-n", ns, "--port-forward", ns, "--kubeconfig", c.Kubeconfig, "--service-account", "dev/alice",
		"--istiod", c.Istiod.CAAddr, "--mesh-root", rootFile}
	local := serveLocal(t)
	steal := startCLI(ctx, append([]string{"steal", "svc/shop:80", "--to", local, "--header", "x-dev=alice"}, as...)...)
	defer steal.stop(t)
	steal.waitFor(t, 2*time.Minute, "stealing shop/shop")

	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, "shop", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	// The test watches istiod's view only to know when to look; the stand-ins have their own.
	view, err := c.WatchWorkloads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := view.WaitRoute(ctx, vip, 2*time.Minute, func(r testbed.Target, ok bool) bool { return ok && r.Waypoint != "" }); err != nil {
		t.Fatalf("node: no route to %s through a waypoint in istiod's view: %v\n%s", vip, err, view.Describe())
	}
	// The client pod's app GETs the ClusterIP (with X-Dev: dev unless ""): "STATUS BODY".
	get := func(dev string) string {
		q := url.Values{"url": {"http://" + vip.String() + "/"}}
		if dev != "" {
			q.Set("header", "X-Dev:"+dev)
		}
		u := "http://" + client.Status.PodIP + ":8080/fetch?" + q.Encode()
		code, body, err := tryGet(u)
		if err != nil || code != http.StatusOK {
			return fmt.Sprintf("GET %s: %d %q %v", u, code, body, err)
		}
		return strings.TrimSpace(body)
	}
	// The session is held by the replica the port-forward reached; the other learns it from the
	// shared session records: bounded retries until the matching request is stolen.
	wait(t, ctx, time.Minute, "the client pod's matching request at the developer's handler", func() (bool, string) {
		got := get("alice")
		return got == "200 local", fmt.Sprintf("%q\nCLI:\n%s", got, steal.output())
	})
	for _, dev := range []string{"", "bob"} {
		if got := get(dev); got != "200 "+shop.Name {
			t.Errorf("node: the client pod's request with x-dev %q: %q, want the real pod's 200 %s", dev, got, shop.Name)
		}
	}
	t.Logf("node: client %s -> %s: x-dev alice at the developer's handler, the others at pod %s", client.Status.PodIP, vip, shop.Name)
	steal.stop(t)

	// detour run reads a real pod's environment.
	envApp(t, ctx, c, ns)
	envPod := runningPod(t, ctx, c, ns, "envapp")
	podVars := podEnv(t, ctx, c, &envPod)
	envFile := filepath.Join(t.TempDir(), "env")
	run := startCLI(ctx, append([]string{"run", "--target", "svc/envapp", "--env-file", envFile}, append(as, "--", "true")...)...)
	if err := run.wait(2 * time.Minute); err != nil {
		t.Fatalf("node: detour run --env-file: %v\n%s", err, run.output())
	}
	raw, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimSpace(string(raw)), "\n")
	var runtimeOnly []string
	for _, kv := range podVars {
		if !slices.Contains(got, kv) {
			runtimeOnly = append(runtimeOnly, kv)
		}
	}
	var extra []string
	for _, kv := range got {
		if !slices.Contains(podVars, kv) {
			extra = append(extra, kv)
		}
	}
	names := func(kvs []string) (n []string) {
		for _, kv := range kvs {
			k, _, _ := strings.Cut(kv, "=")
			n = append(n, k)
		}
		return n
	}
	if len(extra) > 0 || !slices.Equal(names(runtimeOnly), []string{"HOME", "HOSTNAME", "PATH"}) {
		t.Errorf("node: detour run's environment differs from pod %s's\n only detour's: %q\n only the pod's: %q (want HOME, HOSTNAME and PATH: the runtime's)\npod's:\n%s",
			envPod.Name, extra, runtimeOnly, strings.Join(podVars, "\n"))
	}
	for _, want := range []string{"KUBERNETES_SERVICE_HOST=", "SHOP_SERVICE_HOST=" + svc.Spec.ClusterIP, "ENVAPP_PORT_80_TCP_ADDR=", "CFG_greeting=hello",
		"GREETING=hello", "TOKEN=s3cret", "POD_NAME=" + envPod.Name, "POD_IP=" + envPod.Status.PodIP, "SHOP_URL=http://" + svc.Spec.ClusterIP + ":80/" + envPod.Name,
		"ESCAPED=$(POD_NAME)", "MEM_LIMIT=", "CPU_REQUEST_M=50"} {
		if !slices.ContainsFunc(got, func(kv string) bool { return strings.HasPrefix(kv, want) }) {
			t.Errorf("node: no %s... in detour run's environment:\n%s", want, strings.Join(got, "\n"))
		}
	}
	t.Logf("node: detour run gave %d variables, pod %s has %d (+ the runtime's %v)", len(got), envPod.Name, len(podVars), names(runtimeOnly))

	// And CMD gets them.
	cmd := startCLI(ctx, append([]string{"run", "--target", "svc/envapp"}, append(as, "--", "/bin/sh", "-c", "env")...)...)
	if err := cmd.wait(2 * time.Minute); err != nil {
		t.Fatalf("node: detour run -- /bin/sh -c env: %v\n%s", err, cmd.output())
	}
	lines := strings.Split(cmd.output(), "\n")
	for _, kv := range got {
		if !slices.Contains(lines, kv) {
			t.Errorf("node: CMD's environment has no %q", kv)
		}
	}
}

// grantSteal lets developers STEAL through detour in ns (an AuthorizationPolicy on its Gateway).
func grantSteal(t *testing.T, ctx context.Context, c *testbed.Cluster, ns string) {
	t.Helper()
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx, &istiosec.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "devs", Namespace: ns},
		Spec: secv1beta1.AuthorizationPolicy{
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
			Rules: []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Namespaces: []string{"dev"}}}},
				To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"STEAL"}}}}}},
		}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// envApp deploys envapp, whose container's environment uses every source the kubelet has.
func envApp(t *testing.T, ctx context.Context, c *testbed.Cluster, ns string) {
	t.Helper()
	k := c.Client.CoreV1()
	if _, err := k.ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "envapp"}, Data: map[string]string{"greeting": "hello"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "envapp"}, Data: map[string][]byte{"token": []byte("s3cret")}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	yes := true
	ref := func(name string) corev1.LocalObjectReference { return corev1.LocalObjectReference{Name: name} }
	field := func(path string) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}
	}
	deploy(t, ctx, c, ns, "envapp", image.PodAppRef, nil, func(s *corev1.PodSpec) {
		ct := &s.Containers[0]
		ct.Resources.Requests = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("50m")}
		ct.EnvFrom = []corev1.EnvFromSource{
			{Prefix: "CFG_", ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: ref("envapp")}},
			{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: ref("absent"), Optional: &yes}},
		}
		ct.Env = []corev1.EnvVar{
			{Name: "GREETING", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: ref("envapp"), Key: "greeting"}}},
			{Name: "TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: ref("envapp"), Key: "token"}}},
			{Name: "OPTIONAL", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: ref("absent"), Key: "x", Optional: &yes}}},
			{Name: "POD_NAME", ValueFrom: field("metadata.name")}, {Name: "POD_NAMESPACE", ValueFrom: field("metadata.namespace")},
			{Name: "POD_UID", ValueFrom: field("metadata.uid")}, {Name: "APP", ValueFrom: field("metadata.labels['app']")},
			{Name: "NODE", ValueFrom: field("spec.nodeName")}, {Name: "SA", ValueFrom: field("spec.serviceAccountName")},
			{Name: "POD_IP", ValueFrom: field("status.podIP")}, {Name: "POD_IPS", ValueFrom: field("status.podIPs")},
			{Name: "HOST_IP", ValueFrom: field("status.hostIP")}, {Name: "HOST_IPS", ValueFrom: field("status.hostIPs")},
			{Name: "MEM_LIMIT", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory"}}}, // the node's allocatable
			{Name: "CPU_REQUEST_M", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "requests.cpu", Divisor: resource.MustParse("1m")}}},
			{Name: "SHOP_URL", Value: "http://$(SHOP_SERVICE_HOST):$(SHOP_SERVICE_PORT)/$(POD_NAME)"},
			{Name: "ESCAPED", Value: "$$(POD_NAME)"},
		}
	})
}

// podEnv is the container's environment as a process started in it sees it: `podapp env` by
// exec, through the API server and the kubelet.
func podEnv(t *testing.T, ctx context.Context, c *testbed.Cluster, pod *corev1.Pod) []string {
	t.Helper()
	req := c.Client.CoreV1().RESTClient().Post().Resource("pods").Namespace(pod.Namespace).Name(pod.Name).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: pod.Spec.Containers[0].Name, Command: []string{"/podapp", "env"}, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	exec, err := remotecommand.NewSPDYExecutor(c.REST, http.MethodPost, req.URL())
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	ectx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := exec.StreamWithContext(ectx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr}); err != nil {
		t.Fatalf("node: exec podapp env in %s: %v: %s", pod.Name, err, stderr.String())
	}
	return strings.Split(strings.TrimSpace(stdout.String()), "\n")
}

// serveLocal is the developer's handler on loopback: it answers "local".
func serveLocal(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "local") })}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(l) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return l.Addr().String()
}

// cliRun is the CLI (cli.Run, its own code) running in this process as a user's shell runs the
// binary, until it exits or is stopped.
type cliRun struct {
	cancel context.CancelFunc
	done   chan struct{}
	code   int // set before done is closed
	mu     sync.Mutex
	out    bytes.Buffer
}

func startCLI(ctx context.Context, args ...string) *cliRun {
	ctx, cancel := context.WithCancel(ctx)
	r := &cliRun{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.code = cli.Run(ctx, args, r, r)
	}()
	return r
}

func (r *cliRun) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.out.Write(p)
}

func (r *cliRun) output() string { r.mu.Lock(); defer r.mu.Unlock(); return r.out.String() }

// waitFor waits (at most timeout) for s in the output, failing the test if it does not come or
// the CLI exits first.
func (r *cliRun) waitFor(t *testing.T, timeout time.Duration, s string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(r.output(), s) {
		select {
		case <-r.done:
			t.Fatalf("node: the CLI exited (%d) before %q:\n%s", r.code, s, r.output())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("node: no %q from the CLI in %v:\n%s", s, timeout, r.output())
		}
	}
}

// wait waits (at most timeout) for the CLI to exit; an error unless it exited 0.
func (r *cliRun) wait(timeout time.Duration) error {
	select {
	case <-r.done:
	case <-time.After(timeout):
		r.cancel()
		<-r.done
		return fmt.Errorf("still running after %v", timeout)
	}
	if r.code != 0 {
		return fmt.Errorf("exit %d", r.code)
	}
	return nil
}

// stop ends the CLI as Ctrl-C does and waits for it (30 s at most). Idempotent.
func (r *cliRun) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		t.Errorf("node: the CLI did not exit within 30 s of its cancel:\n%s", r.output())
	}
}
