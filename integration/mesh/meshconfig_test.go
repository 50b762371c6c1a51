package mesh

import (
	"context"
	"sync"
	"testing"
	"time"

	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
)

// istiod's `istio` ConfigMap (key `mesh`) in the root namespace is watched: its
// extensionProviders reach Discovery.MeshConfig when it is created, changed and deleted.
func TestDiscoveryMeshConfig(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var providers []string
	seen := 0
	d := &mesh.Discovery{Kube: c.Client, Istio: ic, Waypoint: authz.Waypoint{Namespace: "shop", Gateway: "detour"},
		MeshConfig: func(mc *meshv1alpha1.MeshConfig) {
			mu.Lock()
			defer mu.Unlock()
			seen++
			providers = nil
			for _, p := range mc.GetExtensionProviders() {
				providers = append(providers, p.GetName())
			}
		}}
	startDiscovery(ctx, t, d)
	names := func(want ...string) func() bool {
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			if seen == 0 || len(providers) != len(want) {
				return false
			}
			for i := range want {
				if providers[i] != want[i] {
					return false
				}
			}
			return true
		}
	}
	within(t, "no ConfigMap: an empty mesh config", names())
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: mesh.MeshConfigMap, Namespace: "istio-system"}, Data: map[string]string{mesh.MeshConfigKey: `
extensionProviders:
- name: opa
  envoyExtAuthzGrpc: {service: opa.shop.svc.cluster.local, port: 9191}
`}}
	if cm, err = c.Client.CoreV1().ConfigMaps("istio-system").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("created: %v", within(t, "provider opa", names("opa")))
	cm.Data[mesh.MeshConfigKey] += "- name: oauth\n  envoyExtAuthzHttp: {service: oauth.shop.svc.cluster.local, port: 8080}\n"
	if _, err = c.Client.CoreV1().ConfigMaps("istio-system").Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("updated: %v", within(t, "providers opa, oauth", names("opa", "oauth")))
	if err := c.Client.CoreV1().ConfigMaps("istio-system").Delete(ctx, mesh.MeshConfigMap, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("deleted: %v", within(t, "no providers", names()))
}

// The installed waypoint, as its own service account (the API server's RBAC deciding), reads
// istiod's mesh config: the installer's Role in the root namespace admits the informer's get and
// its list/watch by name, so a provider added to the ConfigMap reaches Discovery.MeshConfig.
func TestInstalledWaypointReadsMeshConfig(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	if code, out := detour(t, "install", "--kubeconfig", c.Kubeconfig, "-n", ns); code != 0 {
		t.Fatalf("install: %s", out)
	}
	cfg := rest.CopyConfig(c.REST)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":detour",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ic, err := istioclient.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var providers []string
	d := &mesh.Discovery{Kube: kc, Istio: ic, Namespace: ns, Waypoint: authz.Waypoint{Namespace: ns, Gateway: "detour"},
		MeshConfig: func(mc *meshv1alpha1.MeshConfig) {
			mu.Lock()
			defer mu.Unlock()
			providers = nil
			for _, p := range mc.GetExtensionProviders() {
				providers = append(providers, p.GetName())
			}
		}}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: mesh.MeshConfigMap, Namespace: "istio-system"}, Data: map[string]string{mesh.MeshConfigKey: `
extensionProviders:
- name: opa
  envoyExtAuthzGrpc: {service: opa.shop.svc.cluster.local, port: 9191}
`}}
	if _, err := c.Client.CoreV1().ConfigMaps("istio-system").Create(ctx, cm, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	startDiscovery(ctx, t, d)
	t.Logf("read as the waypoint: %v", within(t, "provider opa", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(providers) == 1 && providers[0] == "opa"
	}))
	if _, err := kc.CoreV1().ConfigMaps("istio-system").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the waypoint read another ConfigMap of the root namespace: %v", err)
	}
}
