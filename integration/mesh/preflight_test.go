package mesh

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

// Acceptance 2 of the release issue: on a cluster without the Gateway API CRDs (nor Istio's),
// install is refused before anything is written, with the fix.
func TestInstallRefusedWithoutCRDs(t *testing.T) {
	c := testbed.Start(t, testbed.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Namespace(ctx, "shop", nil); err != nil {
		t.Fatal(err)
	}
	code, out := detour(t, "install", "-n", "shop", "--kubeconfig", c.Kubeconfig)
	for _, want := range []string{
		"mesh: install into shop refused, nothing was written: 2 problem(s)",
		"gateway-api the cluster does not serve gateway.networking.k8s.io/v1 gateways (its CRDs are not installed)",
		"fix:      " + mesh.GatewayAPIInstall,
		"istio-crds  the cluster does not serve security.istio.io/v1 authorizationpolicies",
	} {
		if code == 0 || !strings.Contains(out, want) {
			t.Errorf("install: code %d, output lacks %q:\n%s", code, want, out)
		}
	}
	nothingLeft(t, c, "shop")
}

// nothingLeft fails on any object of detour's installation in ns.
func nothingLeft(t *testing.T, c *testbed.Cluster, ns string) {
	t.Helper()
	ctx := context.Background()
	for _, err := range []error{
		get(c.Client.CoreV1().ServiceAccounts(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().Roles(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().RoleBindings(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().ClusterRoles().Get(ctx, "detour:"+ns+":detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().ClusterRoleBindings().Get(ctx, "detour:"+ns+":detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().Roles("istio-system").Get(ctx, "detour:"+ns+":detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().RoleBindings("istio-system").Get(ctx, "detour:"+ns+":detour", metav1.GetOptions{})),
		get(c.Client.CoreV1().ConfigMaps(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.AppsV1().Deployments(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.CoreV1().Services(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.PolicyV1().PodDisruptionBudgets(ns).Get(ctx, "detour", metav1.GetOptions{})),
	} {
		if !apierrors.IsNotFound(err) {
			t.Errorf("an object left behind: %v", err)
		}
	}
	dyn, err := dynamic.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	// A deleted CRD goes when the API server's finalizer (customresourcecleanup) has removed its
	// objects, a moment after the delete: it must be terminating at once and gone soon after.
	crds := dyn.Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"})
	wait, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		crd, err := crds.Get(wait, "debugsessions.detour.dev", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return
		}
		if err == nil && crd.GetDeletionTimestamp() == nil {
			t.Errorf("the DebugSession CRD left behind, not being deleted")
			return
		}
		if wait.Err() != nil {
			t.Errorf("the DebugSession CRD still there 30 s after its delete: %v", err)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// failApply makes every real (not dry-run) server-side apply of one resource fail.
type failApply struct {
	dynamic.Interface
	resource string
}

func (f failApply) Resource(gvr schema.GroupVersionResource) dynamic.NamespaceableResourceInterface {
	r := f.Interface.Resource(gvr)
	if gvr.Resource != f.resource {
		return r
	}
	return failResource{r}
}

type failResource struct {
	dynamic.NamespaceableResourceInterface
}

func (r failResource) Namespace(ns string) dynamic.ResourceInterface {
	return failNamespaced{r.NamespaceableResourceInterface.Namespace(ns)}
}

type failNamespaced struct{ dynamic.ResourceInterface }

func (r failNamespaced) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, sub ...string) (*unstructured.Unstructured, error) {
	if pt == types.ApplyPatchType && len(opts.DryRun) == 0 {
		return nil, errors.New("forced by the test")
	}
	return r.ResourceInterface.Patch(ctx, name, pt, data, opts, sub...)
}

// Acceptance 2: an install failing after its first writes (the Service's apply fails, after the
// CRD, ServiceAccount, RBAC, ConfigMap and Deployment were written) leaves nothing of detour's.
func TestInstallFailingAfterWritesLeavesNothing(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.Namespace(ctx, "shop", map[string]string{"istio.io/dataplane-mode": "ambient"}); err != nil {
		t.Fatal(err)
	}
	clients, err := mesh.NewClients(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	// istiod publishes istio-ca-root-cert into the new namespace a moment later.
	for {
		if _, err := c.Client.CoreV1().ConfigMaps("shop").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{}); err == nil {
			break
		} else if ctx.Err() != nil {
			t.Fatalf("istiod never published istio-ca-root-cert into shop: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	in := &mesh.Installer{Client: failApply{clients.Dynamic, "services"}, Kube: clients.Kube, Namespace: "shop", Image: "example.test/detour:dev"}
	err = in.Install(ctx, nil)
	if err == nil || !strings.Contains(err.Error(), "forced by the test") ||
		!strings.Contains(err.Error(), "mesh: removed what this install wrote: CustomResourceDefinition debugsessions.detour.dev, ServiceAccount detour, Role detour, RoleBinding detour, ClusterRole detour:shop:detour, ClusterRoleBinding detour:shop:detour, Role detour:shop:detour, RoleBinding detour:shop:detour, ConfigMap detour, Deployment detour") {
		t.Fatalf("install: %v", err)
	}
	nothingLeft(t, c, "shop")
}
