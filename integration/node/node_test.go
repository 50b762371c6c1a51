package node

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/detour-mesh/detour/integration/image"
	"github.com/detour-mesh/detour/integration/testbed"
)

// TestNode runs Deployments of the locally built images on the test bed's node: the node is
// Ready; the test app's pod is Running and Ready (an HTTP readiness probe, run by the kubelet),
// its ServiceAccount token mounted (the app serves the file; the API server's TokenReview says
// whose it is), reachable on its pod IP from the host, and the controller-manager's EndpointSlice
// for a Service over it lists that address, ready, and the Service's ClusterIP reaches it
// (kube-proxy); Istio's echo app answers on its pod IP.
func TestNode(t *testing.T) {
	skipUnlessNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	dir := t.TempDir()
	built := time.Now()
	pause, app, err := image.NodeImages(ctx, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node: pause (%d bytes) and podapp (%d bytes) images built in %v", len(pause), len(app), time.Since(built).Round(time.Millisecond))
	archives := writeArchives(t, dir, map[string][]byte{"pause.tar": pause, "podapp.tar": app})
	c := testbed.Start(t, testbed.Options{Node: &testbed.NodeOptions{Images: archives, SandboxImage: image.PauseRef}})
	n := c.Node
	t.Logf("node: %s Ready, node IP %s, pods in %s", n.Name, n.IP, n.Subnet)

	const ns = "demo"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	deploy(t, ctx, c, ns, "app", image.PodAppRef, nil)
	pod := runningPod(t, ctx, c, ns, "app")
	t.Logf("node: pod %s Running and Ready on %s at %s, %v after the Deployment", pod.Name, pod.Spec.NodeName, pod.Status.PodIP, time.Since(started).Round(time.Millisecond))
	if pod.Spec.NodeName != n.Name {
		t.Errorf("node: pod scheduled to %q, want %q", pod.Spec.NodeName, n.Name)
	}

	// Reachable on its pod IP from the host (through the node's CNI bridge).
	base := "http://" + pod.Status.PodIP + ":8080"
	if code, body := get(t, base+"/"); code != http.StatusOK || body != pod.Name {
		t.Errorf("node: GET %s/ = %d %q, want 200 and the pod's hostname %q", base, code, body, pod.Name)
	}

	// The ServiceAccount token, as the container reads it, is the pod's own.
	code, token := get(t, base+"/token")
	if code != http.StatusOK {
		t.Fatalf("node: GET %s/token = %d %q: no ServiceAccount token mounted", base, code, token)
	}
	review, err := c.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := "system:serviceaccount:demo:app"; !review.Status.Authenticated || review.Status.User.Username != want {
		t.Errorf("node: the mounted token authenticates as %q (authenticated %v, %s), want %q", review.Status.User.Username, review.Status.Authenticated, review.Status.Error, want)
	}
	if got := review.Status.User.Extra["authentication.kubernetes.io/pod-name"]; len(got) != 1 || got[0] != pod.Name {
		t.Errorf("node: the mounted token is bound to pod %v, want %s", got, pod.Name)
	}

	// The controller-manager's EndpointSlice for the Service lists the pod, ready, on 8080.
	wait(t, ctx, time.Minute, "the Service's EndpointSlice listing the pod", func() (bool, string) {
		slices, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=app"})
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, s := range slices.Items {
			for _, e := range s.Endpoints {
				r := e.Conditions.Ready != nil && *e.Conditions.Ready
				seen = append(seen, fmt.Sprintf("%v ready=%v ports=%d", e.Addresses, r, len(s.Ports)))
				if r && len(e.Addresses) == 1 && e.Addresses[0] == pod.Status.PodIP && len(s.Ports) == 1 && *s.Ports[0].Port == 8080 {
					return true, ""
				}
			}
		}
		return false, fmt.Sprintf("%d slices, endpoints %v", len(slices.Items), seen)
	})

	// The Service's ClusterIP, through kube-proxy's nftables rules, from the host, once
	// kube-proxy has the EndpointSlice (until then it rejects: connection refused).
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, "app", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := "http://" + svc.Spec.ClusterIP + ":80/"
	wait(t, ctx, 30*time.Second, "GET "+vip+" answering the pod's hostname", func() (bool, string) {
		code, body, err := tryGet(vip)
		return err == nil && code == http.StatusOK && body == pod.Name, fmt.Sprintf("%d %q %v", code, body, err)
	})

	// The API server from inside the pod, the way in-cluster clients reach it: the kubernetes
	// Service's ClusterIP (kube-proxy, to the endpoint the API server's reconciler writes: the
	// node's IP it serves on), TLS checked against the mounted CA, the mounted token.
	wait(t, ctx, 30*time.Second, "the pod reaching the API server at the kubernetes Service", func() (bool, string) {
		code, body, err := tryGet(base + "/kube")
		return err == nil && code == http.StatusOK && strings.Contains(body, `"gitVersion"`), fmt.Sprintf("%d %q %v", code, body, err)
	})

	// Istio's echo app, built (minutes the first time: a static build of Istio's packages) and
	// imported while the node runs.
	built = time.Now()
	istioDir, err := testbed.ModuleDir(ctx, "istio.io/istio@"+testbed.IstioVersion)
	if err != nil {
		t.Fatal(err)
	}
	echo, err := image.EchoImage(ctx, istioDir, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node: Istio's echo image (%d bytes) built in %v", len(echo), time.Since(built).Round(time.Millisecond))
	echoPath := filepath.Join(dir, "echo.tar")
	if err := os.WriteFile(echoPath, echo, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := n.Import(ctx, echoPath); err != nil {
		t.Fatal(err)
	}
	deploy(t, ctx, c, ns, "echo", image.EchoRef, []string{"--port", "8080", "--grpc", "7070", "--version", "v1"})
	echoPod := runningPod(t, ctx, c, ns, "echo")
	if code, body := get(t, "http://"+echoPod.Status.PodIP+":8080/"); code != http.StatusOK || !strings.Contains(body, "Hostname="+echoPod.Name) {
		t.Errorf("node: Istio's echo at %s:8080 answered %d %q, want 200 and Hostname=%s", echoPod.Status.PodIP, code, body, echoPod.Name)
	}

	// Its log, through the API server from the kubelet (containerLogs on the kubelet's port).
	logs, err := c.Client.CoreV1().Pods(ns).GetLogs(echoPod.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil || !strings.Contains(string(logs), "8080") {
		t.Errorf("node: the echo pod's log through the kubelet: %v %q, want a line naming port 8080", err, logs)
	}
}

// deploy creates ns/name's ServiceAccount, a Service and a Deployment of one pod running img
// with args (its port 8080 named http, an HTTP readiness probe on it, never pulled) under it;
// each edit changes the pod's spec. The Service comes first, so that the pod's service links
// (the kubelet's, when the container starts) always have it.
func deploy(t *testing.T, ctx context.Context, c *testbed.Cluster, ns, name, img string, args []string, edits ...func(*corev1.PodSpec)) {
	t.Helper()
	if _, err := c.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	labels := map[string]string{"app": name}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr(int32(1)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					ServiceAccountName:            name,
					TerminationGracePeriodSeconds: ptr(int64(2)),
					Containers: []corev1.Container{{
						Name: name, Image: img, Args: args, ImagePullPolicy: corev1.PullNever,
						Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromString("http")}},
							PeriodSeconds: 1,
						},
					}},
				},
			},
		},
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
	}
	if _, err := c.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, edit := range edits {
		edit(&dep.Spec.Template.Spec)
	}
	if _, err := c.Client.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// runningPod waits (3 minutes at most) for the one pod of Deployment ns/name to be Running and
// Ready.
func runningPod(t *testing.T, ctx context.Context, c *testbed.Cluster, ns, name string) corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	wait(t, ctx, 3*time.Minute, "the pod of Deployment "+ns+"/"+name+" Running and Ready", func() (bool, string) {
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
		if err != nil {
			return false, err.Error()
		}
		if len(pods.Items) != 1 {
			return false, fmt.Sprintf("%d pods", len(pods.Items))
		}
		pod = pods.Items[0]
		return pod.Status.Phase == corev1.PodRunning && ready(&pod), describe(&pod)
	})
	return pod
}

// skipUnlessNode skips, saying why, where a node cannot run: not root, or no containerd, runc,
// ctr, ip or CNI plugins.
func skipUnlessNode(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("node: skipping: a node (containerd, kubelet, network namespaces) needs root")
	}
	for _, bin := range []string{"containerd", "ctr", "runc", "ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("node: skipping: no %s on PATH (apt-get install containerd runc iproute2)", bin)
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat("/usr/lib/cni/" + p); err != nil {
			t.Skipf("node: skipping: no CNI plugin /usr/lib/cni/%s (apt-get install containernetworking-plugins)", p)
		}
	}
}

// wait polls cond every 250 ms until it holds, failing the test with cond's last word after
// timeout.
func wait(t *testing.T, ctx context.Context, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("node: waiting %v for %s: %s", timeout, what, last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// describe is a pod's phase, conditions and container states, for a wait's last word.
func describe(p *corev1.Pod) string {
	var b strings.Builder
	fmt.Fprintf(&b, "pod %s phase %s node %q ip %q;", p.Name, p.Status.Phase, p.Spec.NodeName, p.Status.PodIP)
	for _, c := range p.Status.Conditions {
		fmt.Fprintf(&b, " %s=%s(%s %s)", c.Type, c.Status, c.Reason, c.Message)
	}
	for _, cs := range p.Status.ContainerStatuses {
		switch {
		case cs.State.Waiting != nil:
			fmt.Fprintf(&b, " %s waiting %s: %s", cs.Name, cs.State.Waiting.Reason, cs.State.Waiting.Message)
		case cs.State.Terminated != nil:
			fmt.Fprintf(&b, " %s terminated %s (%d): %s", cs.Name, cs.State.Terminated.Reason, cs.State.Terminated.ExitCode, cs.State.Terminated.Message)
		case cs.State.Running != nil:
			fmt.Fprintf(&b, " %s running", cs.Name)
		}
	}
	return b.String()
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	code, body, err := tryGet(url)
	if err != nil {
		t.Fatalf("node: GET %s: %v", url, err)
	}
	return code, body
}

func tryGet(url string) (int, string, error) { return tryGetN(url, 16<<10) }

// tryGetN GETs url (15 s at most: a /fetch waits up to 10 s for the pod's own GET), reading at most limit bytes of the body.
func tryGetN(url string, limit int64) (int, string, error) {
	c := &http.Client{Timeout: 15 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, limit))
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

func ptr[T any](v T) *T { return &v }

// writeArchives writes each named image archive into dir for the node to import, returning
// their paths.
func writeArchives(t *testing.T, dir string, images map[string][]byte) []string {
	t.Helper()
	var archives []string
	for name, b := range images {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		archives = append(archives, p)
	}
	return archives
}
