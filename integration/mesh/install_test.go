package mesh

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/detour-mesh/detour/cmd/detour/cli"
	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
)

func detour(t *testing.T, args ...string) (int, string) {
	if len(args) > 0 && args[0] == "install" && !slices.Contains(args, "--print") {
		// The test bed runs no controllers (no pod ever becomes available), and this CLI is a
		// development build, which has no published image.
		args = append(args, "--wait=false", "--image", "example.test/detour:dev")
	}
	var out bytes.Buffer
	code := cli.Run(context.Background(), args, &out, &out)
	return code, out.String()
}

// dump renders what a user would compare: the namespace and the given services, without the
// fields the API server changes on every write, and without status (what controllers, istiod
// among them, report about the objects, asynchronously: istiod's WaypointBound condition follows
// the binding a moment later).
func dump(t *testing.T, c *testbed.Cluster, ns string, services ...string) string {
	ctx := context.Background()
	var objs []any
	n, err := c.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	clean := func(m *metav1.ObjectMeta) { m.ResourceVersion, m.ManagedFields, m.Generation = "", nil, 0 }
	clean(&n.ObjectMeta)
	n.Status = corev1.NamespaceStatus{}
	objs = append(objs, n)
	for _, s := range services {
		svc, err := c.Client.CoreV1().Services(ns).Get(ctx, s, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		clean(&svc.ObjectMeta)
		svc.Status = corev1.ServiceStatus{}
		objs = append(objs, svc)
	}
	b, err := yaml.Marshal(objs)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// readyEndpoints plays the endpoint controller for a Service the test bed has no pods for.
func readyEndpoints(t *testing.T, c *testbed.Cluster, ns, svc, ip string, port int32) {
	ready, name := true, "mesh"
	tcp := corev1.ProtocolTCP
	_, err := c.Client.DiscoveryV1().EndpointSlices(ns).Create(context.Background(), &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: svc + "-testbed", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &tcp}},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

func waypointOf(t *testing.T, c *testbed.Cluster, ns, svc, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.WaitAmbient(ctx, ns, svc, time.Minute, func(s *testbed.AmbientService) bool { return s != nil && s.WaypointHost() == want }); err != nil {
		t.Fatalf("istiod's ambient view never gave %s/%s the waypoint %q: %v", ns, svc, want, err)
	}
}

// Acceptance 1 and 2 of the Kubernetes issue, and the manifests validated by server-side dry run.
func TestInstallBindUninstall(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, map[string]string{"team": "shop"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Service(ctx, ns, "web", map[string]string{"app": "web"}, []testbed.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}, "10.244.9.20"); err != nil {
		t.Fatal(err)
	}
	// Another waypoint already runs in the namespace.
	if _, err := c.Service(ctx, ns, "other", nil, []testbed.ServicePort{{Name: "mesh", Port: 15008, TargetPort: 15008}}, "10.244.9.30"); err != nil {
		t.Fatal(err)
	}
	if err := c.Waypoint(ctx, ns, "other", "other.shop.svc.cluster.local", "service"); err != nil {
		t.Fatal(err)
	}
	kc := []string{"--kubeconfig", c.Kubeconfig, "-n", ns}

	// Server-side dry run validates every manifest and changes nothing.
	before := dump(t, c, ns, "web", "other")
	if code, out := detour(t, append([]string{"install", "--dry-run", "--bind", "svc/web"}, kc...)...); code != 0 || !strings.Contains(out, "dry run") {
		t.Fatalf("dry run: %d %s", code, out)
	}
	if _, err := c.Client.AppsV1().Deployments(ns).Get(ctx, "detour", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the dry run created the Deployment: %v", err)
	}
	if after := dump(t, c, ns, "web", "other"); after != before {
		t.Fatalf("the dry run changed objects:\n%s\n--- before\n%s", after, before)
	}

	// 1. Install, bind svc/web: istiod hands web to detour. Uninstall: as before.
	if code, out := detour(t, append([]string{"install", "--bind", "svc/web"}, kc...)...); code != 0 {
		t.Fatalf("install: %s", out)
	}
	readyEndpoints(t, c, ns, "detour", "10.244.9.10", 15008)
	waypointOf(t, c, ns, "web", "detour.shop.svc.cluster.local")
	mayDiscover(t, c, ns, "detour", true)
	if code, out := detour(t, append([]string{"install", "--bind", "svc/web"}, kc...)...); code != 0 {
		t.Fatalf("install again (idempotent): %s", out)
	}
	if code, out := detour(t, append([]string{"uninstall"}, kc...)...); code != 0 {
		t.Fatalf("uninstall: %s", out)
	}
	if after := dump(t, c, ns, "web", "other"); after != before {
		t.Fatalf("after uninstall:\n%s\n--- before install\n%s", after, before)
	}
	for _, err := range []error{
		get(c.Client.AppsV1().Deployments(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.CoreV1().Services(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.CoreV1().ConfigMaps(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.PolicyV1().PodDisruptionBudgets(ns).Get(ctx, "detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().ClusterRoles().Get(ctx, "detour:shop:detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().ClusterRoleBindings().Get(ctx, "detour:shop:detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().Roles("istio-system").Get(ctx, "detour:shop:detour", metav1.GetOptions{})),
		get(c.Client.RbacV1().RoleBindings("istio-system").Get(ctx, "detour:shop:detour", metav1.GetOptions{})),
	} {
		if !apierrors.IsNotFound(err) {
			t.Errorf("an object left behind: %v", err)
		}
	}
	waypointOf(t, c, ns, "web", "")

	// 2. The namespace is bound to the other waypoint: refused without --take-over, taken with it,
	// and given back on uninstall.
	n, err := c.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Labels["istio.io/use-waypoint"] = "other"
	if _, err := c.Client.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waypointOf(t, c, ns, "web", "other.shop.svc.cluster.local")
	before = dump(t, c, ns, "web", "other")
	code, out := detour(t, append([]string{"install", "--bind", "namespace"}, kc...)...)
	if code == 0 || !strings.Contains(out, "namespace shop is bound to waypoint other; pass --take-over") {
		t.Fatalf("install over another waypoint: %d %s", code, out)
	}
	if _, err := c.Client.AppsV1().Deployments(ns).Get(ctx, "detour", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("a refused install created objects: %v", err)
	}
	if code, out := detour(t, append([]string{"install", "--bind", "namespace", "--take-over"}, kc...)...); code != 0 {
		t.Fatalf("take-over: %s", out)
	}
	readyEndpoints(t, c, ns, "detour", "10.244.9.10", 15008)
	waypointOf(t, c, ns, "web", "detour.shop.svc.cluster.local")
	if code, out := detour(t, append([]string{"uninstall"}, kc...)...); code != 0 {
		t.Fatalf("uninstall: %s", out)
	}
	if after := dump(t, c, ns, "web", "other"); after != before {
		t.Fatalf("after uninstalling a take-over:\n%s\n--- before\n%s", after, before)
	}
	waypointOf(t, c, ns, "web", "other.shop.svc.cluster.local")
}

func get[T any](_ T, err error) error { return err }

// mayDiscover checks, as the API server's RBAC decides it, that the installed waypoint's service
// account may read everything its discovery watches (the namespaces' binding labels included:
// cluster-scoped) and no other namespace's services.
func mayDiscover(t *testing.T, c *testbed.Cluster, ns, sa string, want bool) {
	t.Helper()
	user := "system:serviceaccount:" + ns + ":" + sa
	for _, tc := range []struct {
		attr authzv1.ResourceAttributes
		want bool
	}{
		{authzv1.ResourceAttributes{Verb: "watch", Resource: "namespaces"}, want},
		{authzv1.ResourceAttributes{Verb: "get", Resource: "namespaces", Name: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Resource: "services", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Resource: "pods", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Group: "security.istio.io", Resource: "authorizationpolicies", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "create", Group: "detour.dev", Resource: "debugsessions", Namespace: ns}, want},
		// the routes the waypoint applies, and the Istio objects it reports (Discovery waits for the
		// informers of the kinds the API server serves: without these it would never be ready)
		{authzv1.ResourceAttributes{Verb: "watch", Group: "gateway.networking.k8s.io", Resource: "httproutes", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Group: "gateway.networking.k8s.io", Resource: "grpcroutes", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Group: "gateway.networking.k8s.io", Resource: "tcproutes", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Group: "gateway.networking.k8s.io", Resource: "tlsroutes", Namespace: ns}, want},
		// its own Gateway: whether it admits services of other namespaces (mesh/scope.go)
		{authzv1.ResourceAttributes{Verb: "watch", Group: "gateway.networking.k8s.io", Resource: "gateways", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Group: "networking.istio.io", Resource: "virtualservices", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "list", Group: "networking.istio.io", Resource: "destinationrules", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "list", Group: "networking.istio.io", Resource: "envoyfilters", Namespace: ns}, want},
		{authzv1.ResourceAttributes{Verb: "list", Group: "extensions.istio.io", Resource: "wasmplugins", Namespace: ns}, want},
		// istiod's mesh config in the root namespace (extensionProviders), that ConfigMap alone:
		// get, and list/watch with its name (the informer's metadata.name field selector).
		{authzv1.ResourceAttributes{Verb: "get", Resource: "configmaps", Namespace: "istio-system", Name: mesh.MeshConfigMap}, want},
		{authzv1.ResourceAttributes{Verb: "watch", Resource: "configmaps", Namespace: "istio-system", Name: mesh.MeshConfigMap}, want},
		{authzv1.ResourceAttributes{Verb: "list", Resource: "configmaps", Namespace: "istio-system"}, false},
		{authzv1.ResourceAttributes{Verb: "get", Resource: "configmaps", Namespace: "istio-system", Name: "istio-ca-root-cert"}, false},
		{authzv1.ResourceAttributes{Verb: "update", Resource: "configmaps", Namespace: "istio-system", Name: mesh.MeshConfigMap}, false},
		{authzv1.ResourceAttributes{Verb: "list", Resource: "services", Namespace: "kube-system"}, false},
		{authzv1.ResourceAttributes{Verb: "update", Resource: "namespaces", Name: ns}, false},
	} {
		attr := tc.attr
		r, err := c.Client.AuthorizationV1().SubjectAccessReviews().Create(context.Background(), &authzv1.SubjectAccessReview{
			Spec: authzv1.SubjectAccessReviewSpec{User: user, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns}, ResourceAttributes: &attr}},
			metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if r.Status.Allowed != tc.want {
			t.Errorf("%s may %s %s/%s in %q: %v, want %v (%s)", user, attr.Verb, attr.Group, attr.Resource, attr.Namespace, r.Status.Allowed, tc.want, r.Status.Reason)
		}
	}
}
