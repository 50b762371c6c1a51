package conformance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/gateway-api/apis/v1alpha2"
	"sigs.k8s.io/gateway-api/apis/v1alpha3"
	xv1alpha1 "sigs.k8s.io/gateway-api/apisx/v1alpha1"
	"sigs.k8s.io/gateway-api/conformance"
	confv1 "sigs.k8s.io/gateway-api/conformance/apis/v1"
	meshtests "sigs.k8s.io/gateway-api/conformance/tests/mesh"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	gwfeatures "sigs.k8s.io/gateway-api/pkg/features"

	"github.com/detour-mesh/detour/cmd/detour/cli"
	"github.com/detour-mesh/detour/integration/image"
	"github.com/detour-mesh/detour/integration/testbed"
)

// TestMeshConformance is issue 17's acceptance 1 and issue 18's acceptance 4: the Gateway API
// mesh conformance suite's own Go code (suite.NewConformanceTestSuite, Setup, Run over
// tests/mesh's MeshConformanceTests) on the test bed's node with istiod, its manifests read from
// the module, Istio's echo app as the image they name, and detour installed by `detour install
// --bind namespace` as the waypoint of gateway-conformance-mesh. The options are those of Istio's
// ambient run (istio tests/integration/ambient/gateway_conformance_test.go; meshOptions says where
// they differ). Each test's result goes to bin/conformance (results.md, report.yaml).
//
// Run one test: make conformance TEST=MeshBasic.
func TestMeshConformance(t *testing.T) {
	if os.Getenv("DETOUR_CONFORMANCE") == "0" {
		t.Skip("conformance: skipping: DETOUR_CONFORMANCE=0")
	}
	skipUnlessNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 35*time.Minute)
	defer cancel()
	ctrllog.SetLogger(logr.Discard()) // controller-runtime's client complains without a logger

	c, detourRef, echoRef := startCluster(t, ctx)
	echoImages, err := manifestImages(conformance.Manifests, "mesh/manifests.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range echoImages {
		if _, err := c.Node.Ctr(ctx, "images", "tag", "--force", echoRef, img); err != nil {
			t.Fatal(err)
		}
		t.Logf("conformance: Istio's echo image tagged %s", img)
	}

	opts, err := meshOptions(c)
	if err != nil {
		t.Fatal(err)
	}
	results := &results{started: time.Now()}
	opts.Hook = results.record
	cs, err := suite.NewConformanceTestSuite(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dumpOnFailure(t, c) })
	phase := time.Now()
	cs.Setup(t, meshtests.MeshConformanceTests)
	t.Logf("conformance: the suite's mesh manifests applied and their pods Ready in %v", time.Since(phase).Round(time.Millisecond))

	// detour as the namespace's waypoint, installed as a user installs it (Istio's run creates
	// its own waypoint here and labels the namespace with it).
	phase = time.Now()
	var out bytes.Buffer
	if code := cli.Run(ctx, []string{"install", "--kubeconfig", c.Kubeconfig, "-n", suite.MeshNamespace, "--bind", "namespace", "--image", detourRef, "--timeout", "3m"}, &out, &out); code != 0 {
		t.Fatalf("conformance: detour install = %d:\n%s", code, out.String())
	}
	t.Logf("conformance: detour install in %v: %s", time.Since(phase).Round(time.Millisecond), strings.TrimSpace(out.String()))

	results.started = time.Now()
	// The suite marks itself done in a cleanup of Run's; this one, registered first, runs after it.
	t.Cleanup(func() {
		report, err := cs.Report()
		if err != nil {
			t.Error(err)
			return
		}
		if err := results.write(filepath.Join("..", "..", "bin", "conformance"), report, t.Logf); err != nil {
			t.Error(err)
		}
	})
	if err := cs.Run(t, meshtests.MeshConformanceTests); err != nil {
		t.Error(err)
	}
	// Before the suite's cleanup deletes the namespace: the traffic crossed detour.
	total, err := crossed(ctx, c.Client, suite.MeshNamespace)
	switch {
	case err != nil:
		t.Error(err)
	case len(total) == 0:
		t.Errorf("conformance: detour's pods counted no HTTP request to a service of %s: the suite's traffic did not cross detour", suite.MeshNamespace)
	default:
		t.Logf("conformance: HTTP requests detour counted, by destination service: %s", summary(total))
	}
}

// startCluster builds the images (pause, Istio's echo app, detour from this checkout), starts the
// test bed with istiod and the node, and imports them.
func startCluster(t *testing.T, ctx context.Context) (c *testbed.Cluster, detourRef, echoRef string) {
	t.Helper()
	built := time.Now()
	pause, _, err := image.NodeImages(ctx, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	istioDir, err := testbed.ModuleDir(ctx, "istio.io/istio@"+testbed.IstioVersion)
	if err != nil {
		t.Fatal(err)
	}
	echo, err := image.EchoImage(ctx, istioDir, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	const version = "v0.0.0-conformance"
	idx, err := image.Build(ctx, image.Options{Source: "../..", Version: version, Created: time.Unix(0, 0),
		Platforms: []v1.Platform{{OS: "linux", Architecture: runtime.GOARCH}}})
	if err != nil {
		t.Fatal(err)
	}
	detourRef = image.Ref(version)
	var detourTar bytes.Buffer
	if err := image.WriteArchive(&detourTar, idx, detourRef, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	t.Logf("conformance: pause, Istio's echo and detour (%s) images built in %v", detourRef, time.Since(built).Round(time.Millisecond))
	dir := t.TempDir()
	var archives []string
	for name, b := range map[string][]byte{"pause.tar": pause, "echo.tar": echo, "detour.tar": detourTar.Bytes()} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		archives = append(archives, p)
	}
	c = testbed.Start(t, testbed.Options{Istiod: true, Node: &testbed.NodeOptions{Images: archives, SandboxImage: image.PauseRef, Ambient: true}})
	return c, detourRef, image.EchoRef
}

// meshOptions are the suite's options as Istio's ambient run sets them, for the mesh half only:
//   - SupportedFeatures: Istio's own set (pilot/pkg/config/kube/gateway/supported_features.go:
//     every feature less GatewayBackendClientCertificate, GatewayHTTPSListenerDetectMisdirected-
//     Requests and UDPRoute, none of them a mesh test's; restated here rather than imported, which
//     would pull Istio's pilot into this module) less MeshConsumerRoute (as that run), and less
//     Gateway: detour is a waypoint, not an ingress, so Setup applies only the mesh manifests,
//     and Run gets only MeshConformanceTests;
//   - no SkipTests: that run's list is two Gateway tests and MeshHTTPRoute307Redirect (a suite
//     bug fixed upstream before v1.6.3), which runs here;
//   - NamespaceLabels istio.io/dataplane-mode=ambient, CleanupBaseResources and
//     CleanupTestResources true (that run's default), the suite's default timeouts;
//   - AllowCRDsMismatch: the test bed's CRDs are v1.6.0's, the suite v1.6.3;
//   - profiles MESH-HTTP (that run's) and MESH-GRPC (MeshGRPCRouteWeight's).
func meshOptions(c *testbed.Cluster) (suite.ConformanceOptions, error) {
	rc := rest.CopyConfig(c.REST) // the suite sets a user agent on it per test
	opts := client.Options{}
	cl, err := client.New(rc, opts)
	if err != nil {
		return suite.ConformanceOptions{}, fmt.Errorf("conformance: %w", err)
	}
	for _, install := range []func(*kruntime.Scheme) error{v1alpha3.Install, v1alpha2.Install, xv1alpha1.Install, gatewayv1.Install, apiextensionsv1.AddToScheme} {
		if err := install(cl.Scheme()); err != nil {
			return suite.ConformanceOptions{}, fmt.Errorf("conformance: %w", err)
		}
	}
	supported := gwfeatures.AllFeatures.Clone().Delete(
		gwfeatures.GatewayBackendClientCertificateFeature, gwfeatures.GatewayHTTPSListenerDetectMisdirectedRequestsFeature, gwfeatures.UDPRouteFeature, // Istio's
		gwfeatures.MeshConsumerRouteFeature, // Istio's ambient run
		gwfeatures.GatewayFeature)           // detour is a waypoint
	return suite.ConformanceOptions{
		ConfigurableOptions: suite.ConfigurableOptions{
			GatewayClassName:     "istio",
			CleanupBaseResources: true,
			CleanupTestResources: true,
			SupportedFeatures:    gwfeatures.SetsToNamesSet(supported).UnsortedList(),
			NamespaceLabels:      map[string]string{"istio.io/dataplane-mode": "ambient"},
			AllowCRDsMismatch:    true,
			ConformanceProfiles:  []suite.ConformanceProfileName{suite.MeshHTTPConformanceProfileName, suite.MeshGRPCConformanceProfileName},
			Implementation: confv1.Implementation{Organization: "detour-mesh", Project: "detour",
				URL: "https://github.com/detour-mesh/detour", Version: "v0.0.0-conformance", Contact: []string{"@detour-mesh/maintainers"}},
		},
		Client:        cl,
		ClientOptions: opts,
		Clientset:     c.Client,
		RestConfig:    rc,
		ManifestFS:    []fs.FS{&conformance.Manifests},
	}, nil
}

// manifestImages are the container images the Deployments in the module's manifest at path name.
func manifestImages(fsys fs.FS, path string) ([]string, error) {
	b, err := fs.ReadFile(fsys, path)
	if err != nil {
		return nil, fmt.Errorf("conformance: %w", err)
	}
	seen := map[string]bool{}
	var images []string
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	for {
		var d appsv1.Deployment
		if err := dec.Decode(&d); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("conformance: decoding %s: %w", path, err)
		}
		if d.Kind != "Deployment" {
			continue
		}
		for _, ctr := range d.Spec.Template.Spec.Containers {
			if !seen[ctr.Image] {
				seen[ctr.Image] = true
				images = append(images, ctr.Image)
			}
		}
	}
	if len(images) == 0 {
		return nil, fmt.Errorf("conformance: no Deployment image in %s", path)
	}
	return images, nil
}

// dumpOnFailure logs, when the test failed, every pod of the mesh namespace (state, and for
// detour's its log through the kubelet).
func dumpOnFailure(t *testing.T, c *testbed.Cluster) {
	if !t.Failed() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pods, err := c.Client.CoreV1().Pods(suite.MeshNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Logf("conformance: listing pods: %v", err)
		return
	}
	for _, p := range pods.Items {
		t.Logf("conformance: pod %s phase %s ip %s labels %v", p.Name, p.Status.Phase, p.Status.PodIP, p.Labels)
		if p.Labels["app.kubernetes.io/name"] != "detour" {
			continue
		}
		logs, err := c.Client.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: "detour", TailLines: ptr(int64(200))}).DoRaw(ctx)
		t.Logf("--- %s log (err %v) ---\n%s", p.Name, err, logs)
	}
}

// skipUnlessNode skips, saying why, where the test bed's node cannot run: not root, or no
// containerd, runc, ctr, ip or CNI plugins.
func skipUnlessNode(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("conformance: skipping: a node (containerd, kubelet, network namespaces) needs root")
	}
	for _, bin := range []string{"containerd", "ctr", "runc", "ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("conformance: skipping: no %s on PATH (apt-get install containerd runc iproute2)", bin)
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat("/usr/lib/cni/" + p); err != nil {
			t.Skipf("conformance: skipping: no CNI plugin /usr/lib/cni/%s (apt-get install containernetworking-plugins)", p)
		}
	}
}

func ptr[T any](v T) *T { return &v }
