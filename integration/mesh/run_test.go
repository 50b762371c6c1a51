package mesh

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
)

// detour run: CMD gets the target's environment (env, envFrom, ConfigMap and Secret references)
// and reaches cluster services by name through the waypoint as the developer, over the HTTP and
// SOCKS5 proxies; a service whose policy denies the developer answers 403 naming the principal;
// CMD's exit code is detour's.
func TestRun(t *testing.T) {
	c := testbed.Start(t, testbed.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	k := c.Client.CoreV1()
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(k.ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "web-config"}, Data: map[string]string{"GREETING": "hello"}}, metav1.CreateOptions{}))
	must(k.Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "web-secret"}, Data: map[string][]byte{"TOKEN": []byte("s3cret")}}, metav1.CreateOptions{}))
	web0, err := k.Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-0", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "web", Image: "none.invalid/web",
			Env: []corev1.EnvVar{{Name: "MODE", Value: "prod"},
				{Name: "TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "web-secret"}, Key: "TOKEN"}}},
				{Name: "POD", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
			EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "web-config"}}}},
		}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	web0.Status.Phase = corev1.PodRunning // no kubelet: the test says so; detour run takes a Running pod's environment
	must(k.Pods(ns).UpdateStatus(ctx, web0, metav1.UpdateOptions{}))
	service := func(name string, selector map[string]string) *corev1.Service {
		s, err := k.Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Selector: selector, Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	service("web", map[string]string{"app": "web"})
	api, vault := service("api", nil), service("vault", nil)

	// api and vault: one pod on 127.0.0.2 behind an HBONE terminator.
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	ca, err := devca.Init(caDir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	svid, err := ca.Issue("spiffe://cluster.local/ns/shop/sa/web", time.Time{}, time.Time{}) // every pod here runs as web
	if err != nil {
		t.Fatal(err)
	}
	app, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	as := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "%s says hi", r.Host) })}
	go as.Serve(app)
	defer as.Close()
	hl, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	term := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()}), nil)}
	go term.Serve(hl)
	defer term.Close()
	appPort, hbonePort := app.Addr().(*net.TCPAddr).Port, hl.Addr().(*net.TCPAddr).Port
	gl, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	grpc_health_v1.RegisterHealthServer(gs, health.NewServer())
	go gs.Serve(gl)
	defer gs.Stop()
	grpcSvc := service("grpc", nil)

	cfg := filepath.Join(dir, "waypoint.yaml")
	doc := fmt.Sprintf(`identity: {source: devca, devca: {dir: %q, id: "spiffe://cluster.local/ns/shop/sa/detour"}}
listeners: {hbone: "127.0.0.1:0", health: "off", tunnel: "127.0.0.1:0", upstreamHBONEPort: %d}
waypoint: {namespace: shop, gateway: detour}
discovery:
  static:
    services:
    - {name: api, namespace: shop, vips: [%s], ports: [{name: http, port: 80, targetPort: %d}], endpoints: [{ip: 127.0.0.2, serviceAccount: web}]}
    - {name: vault, namespace: shop, vips: [%s], ports: [{name: http, port: 80, targetPort: %d}], endpoints: [{ip: 127.0.0.2, serviceAccount: web}]}
    - {name: web, namespace: shop, vips: [10.96.200.1], ports: [{name: http, port: 80, targetPort: %d}], endpoints: [{ip: 127.0.0.2, serviceAccount: web}]}
    - {name: grpc, namespace: shop, vips: [%s], ports: [{name: grpc, port: 80, targetPort: %d}], endpoints: [{ip: 127.0.0.2, serviceAccount: web}]}
    policies:
    - name: developers-steal
      namespace: shop
      spec:
        targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: detour}]
        action: ALLOW
        rules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {methods: [STEAL]}}]}]
    - name: alice-impersonates-web
      namespace: shop
      spec:
        targetRefs: [{kind: Service, name: web}]
        action: ALLOW
        rules: [{from: [{source: {principals: [cluster.local/ns/dev/sa/alice]}}], to: [{operation: {methods: [IMPERSONATE]}}]}]
    - name: no-developers
      namespace: shop
      spec:
        targetRefs: [{kind: Service, name: vault}]
        action: DENY
        rules: [{from: [{source: {namespaces: [dev]}}]}]
`, caDir, hbonePort, api.Spec.ClusterIP, appPort, vault.Spec.ClusterIP, appPort, appPort, grpcSvc.Spec.ClusterIP, gl.Addr().(*net.TCPAddr).Port)
	os.WriteFile(cfg, []byte(doc), 0o600)
	wp := start(t, "waypoint", "--config", cfg)
	tunnel := wp.Find(t, `tunnel=(127\.0\.0\.1:\d+)`)

	script := `echo MODE=$MODE TOKEN=$TOKEN GREETING=$GREETING POD=$POD
curl -sS --max-time 10 http://api.shop.svc.cluster.local/hello; echo
curl -sS --max-time 10 --proxy "$ALL_PROXY" http://api/hello; echo " (socks5)"
curl -sS --max-time 10 http://vault.shop/; echo
exit 7`
	r := start(t, "run", "--target", "svc/web", "-n", ns, "--kubeconfig", c.Kubeconfig, "--waypoint", tunnel,
		"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice", "--", "sh", "-c", script)
	select {
	case <-r.Done:
	case <-time.After(60 * time.Second):
		t.Fatalf("detour run did not end:\n%s", r.Output())
	}
	out := r.Output()
	for _, want := range []string{
		"MODE=prod TOKEN=s3cret GREETING=hello POD=web-0",
		"api.shop.svc.cluster.local says hi",
		"api says hi (socks5)",
		// HTTP is parsed at the waypoint, as at Istio's: the denial is Envoy's 403, not a refused CONNECT.
		"RBAC: access denied",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	t.Logf("detour run output:\n%s", out)
	if code := r.ProcessState.ExitCode(); code != 7 {
		t.Errorf("exit code %d, want CMD's 7\n%s", code, out)
	}

	// --as-target: the target's workload identity, which vault's policy does not deny; only with
	// an IMPERSONATE grant.
	asTarget := func(dev string) *it.Proc {
		p := start(t, "run", "--target", "svc/web", "-n", ns, "--kubeconfig", c.Kubeconfig, "--waypoint", tunnel, "--as-target",
			"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/"+dev, "--", "sh", "-c", "curl -sS --max-time 10 http://vault.shop/")
		<-p.Done
		return p
	}
	if out := asTarget("alice").Output(); !strings.Contains(out, "vault.shop says hi") {
		t.Errorf("--as-target with IMPERSONATE granted:\n%s", out)
	}
	if out := asTarget("bob").Output(); !strings.Contains(out, "IMPERSONATE of web.shop.svc.cluster.local refused for cluster.local/ns/dev/sa/bob") {
		t.Errorf("--as-target without a grant:\n%s", out)
	}

	// gRPC through the SOCKS5 proxy (the process is this test binary, as a gRPC client).
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	g := start(t, "run", "--target", "svc/web", "-n", ns, "--kubeconfig", c.Kubeconfig, "--waypoint", tunnel,
		"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice", "--", "sh", "-c", "DETOUR_TEST_ROLE=grpc-client exec "+self+" grpc.shop:80")
	<-g.Done
	if out := g.Output(); !strings.Contains(out, "grpc health: SERVING") {
		t.Errorf("gRPC through SOCKS5:\n%s", out)
	}

	// Stolen requests reach the local app with their tracing headers (the app is this binary).
	hboneAddr := wp.Find(t, `hbone=(127\.0\.0\.1:\d+)`)
	headersFile := filepath.Join(dir, "headers")
	appAddr := freeAddr(t)
	h := start(t, "run", "--target", "svc/web", "-n", ns, "--kubeconfig", c.Kubeconfig, "--waypoint", tunnel,
		"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice", "--steal", "--header", "x-dev=alice", "--to", appAddr,
		"--", "sh", "-c", "DETOUR_TEST_ROLE=header-app exec "+self+" "+appAddr+" "+headersFile)
	wp.WaitFor(t, `filter="header x-dev=alice"`)
	clientSVID, err := ca.Issue("spiffe://cluster.local/ns/default/sa/client", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	cliTLS, _ := identity.ClientTLS(identity.Static(&identity.Identity{SVID: clientSVID, Bundle: ca.Bundle()}), spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/detour"))
	hd := &hbone.Dialer{}
	defer hd.Close()
	tr := &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return hd.Dial(ctx, hboneAddr, addr, hbone.DialOptions{TLSConfig: cliTLS, Forwarded: `for="10.244.1.9:4000"`})
	}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest("GET", "http://10.96.200.1:80/", nil)
	req.Header.Set("X-Dev", "alice")
	req.Header.Set("Forwarded", `for="192.0.2.7"`)
	req.Header.Set("Baggage", "user=alice")
	req.Header.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	var body []byte
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
		if err == nil {
			body, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) == "local app" {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stolen request never reached the local app: %v %q", err, body)
		}
	}
	got, _ := os.ReadFile(headersFile)
	if want := `forwarded=for="192.0.2.7" baggage=user=alice traceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01`; !strings.Contains(string(got), want) {
		t.Errorf("the local app saw %q, want %q", got, want)
	}
	h.Process.Signal(os.Interrupt)
	<-h.Done

	// A resolver for cluster names, for tools that take one (DETOUR_DNS).
	dnsFile := filepath.Join(dir, "dns")
	r = start(t, "run", "--target", "svc/web", "-n", ns, "--kubeconfig", c.Kubeconfig, "--waypoint", tunnel,
		"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice", "--", "sh", "-c", "echo $DETOUR_DNS > "+dnsFile+"; exec sleep 30")
	var dnsAddr string
	for deadline := time.Now().Add(20 * time.Second); dnsAddr == "" && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile(dnsFile)
		dnsAddr = strings.TrimSpace(string(b))
	}
	res := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "udp", dnsAddr)
	}}
	for _, name := range []string{"api.shop.svc.cluster.local", "api.shop", "api"} {
		addrs, err := res.LookupHost(ctx, name)
		if err != nil || len(addrs) != 1 || addrs[0] != api.Spec.ClusterIP {
			t.Errorf("DNS %s: %v %v, want %s", name, addrs, err, api.Spec.ClusterIP)
		}
	}
	if addrs, err := res.LookupHost(ctx, "nothing.shop.svc.cluster.local"); err == nil {
		t.Errorf("DNS for an unknown service: %v", addrs)
	}
	r.Process.Signal(os.Interrupt)
	<-r.Done

	// Killing CMD ends the session within a second.
	pidFile := filepath.Join(dir, "pid")
	r = runSession(t, c.Kubeconfig, tunnel, caDir, "echo $$ > "+pidFile+"; echo ready; exec sleep 60")
	wp.WaitFor(t, "session: started")
	raw, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(raw)))
	killed := time.Now()
	syscall.Kill(pid, syscall.SIGKILL)
	wp.Find(t, `msg="session: (ended by the developer|tunnel lost)"`) // Ctrl-C, exit and crash look alike here
	if took := time.Since(killed); took > time.Second {
		t.Errorf("the session outlived CMD by %v", took)
	}
	<-r.Done
	if code := r.ProcessState.ExitCode(); code != 137 {
		t.Errorf("detour run after CMD was killed by SIGKILL: exit %d, want 137", code)
	}

	// SIGINT to detour reaches CMD, which decides how to end; its code is detour's.
	r = runSession(t, c.Kubeconfig, tunnel, caDir, `trap 'echo got-int; exit 3' INT; echo ready; sleep 60 >/dev/null 2>&1 & wait`)
	r.Process.Signal(os.Interrupt)
	select {
	case <-r.Done:
	case <-time.After(10 * time.Second):
		t.Fatalf("detour run ignored SIGINT:\n%s", r.Output())
	}
	if code := r.ProcessState.ExitCode(); code != 3 || !strings.Contains(r.Output(), "got-int") {
		t.Errorf("after SIGINT: exit %d\n%s", code, r.Output())
	}
}

// runSession starts `detour run --steal` with script and returns it once the session is up.
func runSession(t *testing.T, kubeconfig, tunnel, caDir, script string) *it.Proc {
	r := start(t, "run", "--target", "svc/web", "-n", "shop", "--kubeconfig", kubeconfig, "--waypoint", tunnel,
		"--ca", caDir, "--id", "spiffe://cluster.local/ns/dev/sa/alice", "--steal", "--to", "127.0.0.1:1", "--", "sh", "-c", script)
	r.WaitFor(t, "ready")
	return r
}
