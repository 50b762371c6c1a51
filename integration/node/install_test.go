package node

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/cmd/detour/cli"
	"github.com/detour-mesh/detour/integration/image"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// TestInstall is issue 18, point 4: detour installed the way users install it, `detour install
// -n NS --bind namespace` with the locally built image (this checkout, imported into the node's
// containerd; its tag is not "latest", so the default pull policy IfNotPresent never pulls), on
// the node with istiod: the Deployment's pods Ready through their own readiness probe (/readyz:
// an identity from istiod's CA, reached at istiod.istio-system.svc:15012 through the node's
// cluster DNS and kube-proxy, and Kubernetes discovery synced, through the kubernetes Service);
// then `detour uninstall` leaves none of detour's objects.
func TestInstall(t *testing.T) {
	skipUnlessNode(t)
	const ns = "shop"
	c := installDetour(t, ns, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	selector := "app.kubernetes.io/name=detour"

	// Each pod's HBONE listener presents the identity istiod's CA issued to detour's service
	// account (the pod got it through istiod.istio-system.svc:15012).
	pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		addr := net.JoinHostPort(p.Status.PodIP, "15008")
		cert, err := peerCert(ctx, addr)
		if err != nil {
			t.Fatalf("node: TLS to %s (%s): %v", addr, p.Name, err)
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: c.Istiod.Roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("node: %s's certificate is not from istiod's CA: %v", p.Name, err)
		}
		want := "spiffe://cluster.local/ns/" + ns + "/sa/detour"
		if len(cert.URIs) != 1 || cert.URIs[0].String() != want {
			t.Errorf("node: %s's certificate names %v, want %s", p.Name, cert.URIs, want)
		}
	}

	code, out := detour(ctx, "uninstall", "--kubeconfig", c.Kubeconfig, "-n", ns)
	if code != 0 {
		t.Fatalf("node: detour uninstall = %d:\n%s", code, out)
	}
	// Nothing of detour's in the namespace (the pods go with their ReplicaSet), nor cluster-wide,
	// nor its binding.
	wait(t, ctx, 2*time.Minute, "nothing of detour's left after uninstall", func() (bool, string) {
		var left []string
		managed := metav1.ListOptions{LabelSelector: mesh.ManagedBy + "=detour"}
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err.Error()
		}
		for _, p := range pods.Items {
			left = append(left, "pod/"+p.Name)
		}
		for kind, list := range map[string]func() (int, error){
			"deployments": func() (int, error) {
				l, err := c.Client.AppsV1().Deployments(ns).List(ctx, managed)
				return lenOr(l, err, func() int { return len(l.Items) })
			},
			"services": func() (int, error) {
				l, err := c.Client.CoreV1().Services(ns).List(ctx, managed)
				return lenOr(l, err, func() int { return len(l.Items) })
			},
			"configmaps": func() (int, error) {
				l, err := c.Client.CoreV1().ConfigMaps(ns).List(ctx, managed)
				return lenOr(l, err, func() int { return len(l.Items) })
			},
			"serviceaccounts": func() (int, error) {
				l, err := c.Client.CoreV1().ServiceAccounts(ns).List(ctx, managed)
				return lenOr(l, err, func() int { return len(l.Items) })
			},
			"clusterroles": func() (int, error) {
				l, err := c.Client.RbacV1().ClusterRoles().List(ctx, managed)
				return lenOr(l, err, func() int { return len(l.Items) })
			},
			"clusterrolebindings": func() (int, error) {
				l, err := c.Client.RbacV1().ClusterRoleBindings().List(ctx, managed)
				return lenOr(l, err, func() int { return len(l.Items) })
			},
			"roles in istio-system": func() (int, error) {
				l, err := c.Client.RbacV1().Roles("istio-system").List(ctx, managed)
				return lenOr(l, err, func() int { return len(l.Items) })
			},
		} {
			n, err := list()
			if err != nil {
				return false, err.Error()
			}
			if n > 0 {
				left = append(left, fmt.Sprintf("%d %s", n, kind))
			}
		}
		n, err := c.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			return false, err.Error()
		}
		if v, ok := n.Labels["istio.io/use-waypoint"]; ok {
			left = append(left, "namespace label istio.io/use-waypoint="+v)
		}
		return len(left) == 0, strings.Join(left, ", ")
	})
}

// installDetour is what the node tests that need detour share: the node with istiod, the pause,
// test app and detour images (this checkout's) imported, namespace ns (with labels), and
// `detour install -n ns --bind namespace` with that image, its two pods Ready through their
// readiness probe (an identity from istiod's CA, reached at istiod.istio-system.svc:15012
// through the node's cluster DNS and kube-proxy, and Kubernetes discovery synced). On failure
// the test logs each detour pod and its log. Its waits are bounded from when the cluster is up
// (the test bed's first run waits minutes for its binaries' builds).
func installDetour(t *testing.T, ns string, labels map[string]string) *testbed.Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	built := time.Now()
	pause, app, err := image.NodeImages(ctx, time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	const version = "v0.0.0-node"
	idx, err := image.Build(ctx, image.Options{Source: "../..", Version: version, Created: time.Unix(0, 0),
		Platforms: []v1.Platform{{OS: "linux", Architecture: runtime.GOARCH}}})
	if err != nil {
		t.Fatal(err)
	}
	ref := image.Ref(version)
	var detourTar bytes.Buffer
	if err := image.WriteArchive(&detourTar, idx, ref, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	t.Logf("node: pause, podapp and detour (%s, %d bytes) images built in %v", ref, detourTar.Len(), time.Since(built).Round(time.Millisecond))
	archives := writeArchives(t, dir, map[string][]byte{"pause.tar": pause, "podapp.tar": app, "detour.tar": detourTar.Bytes()})
	c := testbed.Start(t, testbed.Options{Istiod: true, Node: &testbed.NodeOptions{Images: archives, SandboxImage: image.PauseRef}})
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := c.Namespace(ctx, ns, labels); err != nil {
		t.Fatal(err)
	}
	selector := "app.kubernetes.io/name=detour"
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		pods, err := c.Client.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			t.Logf("node: listing detour's pods: %v", err)
			return
		}
		for _, p := range pods.Items {
			t.Logf("node: %s", describe(&p))
			logs, err := c.Client.CoreV1().Pods(ns).GetLogs(p.Name, &corev1.PodLogOptions{Container: "detour"}).DoRaw(context.Background())
			t.Logf("--- %s log (err %v) ---\n%s", p.Name, err, logs)
		}
	})

	started := time.Now()
	code, out := detour(ctx, "install", "--kubeconfig", c.Kubeconfig, "-n", ns, "--bind", "namespace", "--image", ref, "--timeout", "3m")
	if code != 0 {
		t.Fatalf("node: detour install = %d:\n%s", code, out)
	}
	t.Logf("node: detour install: %s", strings.TrimSpace(out))
	wait(t, ctx, 3*time.Minute, "detour's pods Ready through their readiness probe", func() (bool, string) {
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		readyPods := 0
		for _, p := range pods.Items {
			seen = append(seen, describe(&p))
			if ready(&p) && p.Spec.NodeName == c.Node.Name {
				readyPods++
			}
		}
		return readyPods == 2, strings.Join(seen, "\n")
	})
	t.Logf("node: detour's 2 pods Ready %v after install", time.Since(started).Round(time.Millisecond))
	return c
}

// peerCert is the certificate the server at addr presents (the handshake may then fail for want
// of a client certificate: only the server's is wanted).
func peerCert(ctx context.Context, addr string) (*x509.Certificate, error) {
	var got *x509.Certificate
	d := &tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			c, err := x509.ParseCertificate(raw[0])
			got = c
			return err
		}}}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if conn != nil {
		conn.Close()
	}
	if got != nil {
		return got, nil
	}
	return nil, err
}

func lenOr[T any](_ T, err error, n func() int) (int, error) {
	if err != nil {
		return 0, err
	}
	return n(), nil
}

// detour runs the CLI in the test process, as a user's shell would run the binary.
func detour(ctx context.Context, args ...string) (int, string) {
	var out bytes.Buffer
	code := cli.Run(ctx, args, &out, &out)
	return code, out.String()
}
