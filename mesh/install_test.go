package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/detour-mesh/detour/proxy/config"
)

// cluster is a fake cluster for the installer: the typed clientset answers discovery, access
// reviews and the wait; the dynamic one holds what Install writes (server-side apply played by
// a reactor: create or replace, nothing stored on a dry run).
type cluster struct {
	kube    *kubefake.Clientset
	dyn     *dynamicfake.FakeDynamicClient
	apis    []string            // "group/version resource" served
	denied  map[string]bool     // "verb resource" the user may not
	failOn  map[string]error    // resource -> error of its (non-dry) apply
	applied []string            // resources applied for real, in order
	writes  []k8stesting.Action // dynamic creates, patches and deletes that were not dry runs
}

func newCluster(t *testing.T) *cluster {
	c := &cluster{
		apis:   []string{"gateway.networking.k8s.io/v1 gateways", "gateway.networking.k8s.io/v1 gatewayclasses", "security.istio.io/v1 authorizationpolicies"},
		denied: map[string]bool{}, failOn: map[string]error{},
	}
	c.kube = kubefake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "istio-ca-root-cert", Namespace: "shop"}},
	)
	c.kube.PrependReactor("create", "selfsubjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		r := a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SelfSubjectAccessReview).DeepCopy()
		at := r.Spec.ResourceAttributes
		r.Status.Allowed = !c.denied[at.Verb+" "+at.Resource] && !c.denied[at.Verb+" "+at.Resource+" "+at.Namespace] &&
			!c.denied[at.Verb+" "+at.Resource+"/"+at.Name+" "+at.Namespace]
		return true, r, nil
	})
	c.kube.PrependReactor("get", "resource", func(k8stesting.Action) (bool, runtime.Object, error) {
		disc := c.kube.Discovery().(*fakediscovery.FakeDiscovery)
		disc.Resources = nil
		for _, api := range c.apis {
			gv, res, _ := strings.Cut(api, " ")
			disc.Resources = append(disc.Resources, &metav1.APIResourceList{GroupVersion: gv, APIResources: []metav1.APIResource{{Name: res}}})
		}
		return false, nil, nil
	})
	class := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": map[string]any{"name": "istio-waypoint"}}}
	web := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Service",
		"metadata": map[string]any{"name": "web", "namespace": "shop", "labels": map[string]any{"app": "web"}}}}
	c.dyn = dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{
		gvrGateway: "GatewayList", gvrService: "ServiceList",
		gvrVirtualService: "VirtualServiceList", gvrDestinationRule: "DestinationRuleList", gvrEnvoyFilter: "EnvoyFilterList",
		gvrWasmPlugin: "WasmPluginList", gvrTrafficExtension: "TrafficExtensionList", gvrTelemetry: "TelemetryList",
		gvrRoute("httproutes"): "HTTPRouteList", gvrRoute("grpcroutes"): "GRPCRouteList", gvrRoute("tcproutes"): "TCPRouteList", gvrRoute("tlsroutes"): "TLSRouteList"}, class, web)
	c.dyn.PrependReactor("*", "*", func(a k8stesting.Action) (bool, runtime.Object, error) {
		switch a := a.(type) {
		case k8stesting.PatchAction:
			opts := a.(k8stesting.PatchActionImpl).PatchOptions
			if a.GetPatchType() != types.ApplyPatchType {
				c.writes = append(c.writes, a)
				return false, nil, nil
			}
			return c.apply(a, len(opts.DryRun) > 0)
		case k8stesting.CreateAction, k8stesting.DeleteAction, k8stesting.UpdateAction:
			c.writes = append(c.writes, a)
		}
		return false, nil, nil
	})
	return c
}

func (c *cluster) apply(a k8stesting.PatchAction, dry bool) (bool, runtime.Object, error) {
	obj := &unstructured.Unstructured{}
	if err := json.Unmarshal(a.GetPatch(), &obj.Object); err != nil {
		return true, nil, err
	}
	if dry {
		return true, obj, nil
	}
	c.writes = append(c.writes, a)
	if err := c.failOn[a.GetResource().Resource]; err != nil {
		return true, nil, err
	}
	c.applied = append(c.applied, a.GetResource().Resource)
	tr := c.dyn.Tracker()
	if _, err := tr.Get(a.GetResource(), a.GetNamespace(), a.GetName()); apierrors.IsNotFound(err) {
		return true, obj, tr.Create(a.GetResource(), obj, a.GetNamespace())
	}
	return true, obj, tr.Update(a.GetResource(), obj, a.GetNamespace())
}

func (c *cluster) installer() *Installer {
	return &Installer{Client: c.dyn, Kube: c.kube, Namespace: "shop", Image: "example.test/detour:v1", rootCertWait: time.Millisecond}
}

// left lists the objects of the installation that exist.
func (c *cluster) left(in *Installer) []string {
	var out []string
	all := *in
	all.Pod.PodMonitor = true
	for _, o := range all.Objects() {
		name := o.Body["metadata"].(map[string]any)["name"].(string)
		if _, err := in.resource(o).Get(context.Background(), name, metav1.GetOptions{}); err == nil {
			out = append(out, o.Resource.Resource+"/"+name)
		}
	}
	return out
}

// Without the Gateway API CRDs the install is refused before anything is written, with the fix.
func TestInstallRefusedWithoutGatewayAPI(t *testing.T) {
	c := newCluster(t)
	c.apis = []string{"security.istio.io/v1 authorizationpolicies"}
	err := c.installer().Install(context.Background(), []Target{{Service: "web"}})
	var pe *PreflightError
	if !errors.As(err, &pe) {
		t.Fatalf("install: %v, want a PreflightError", err)
	}
	want := "mesh: install into shop refused, nothing was written: 1 problem(s)\n" +
		"  gateway-api the cluster does not serve gateway.networking.k8s.io/v1 gateways (its CRDs are not installed)\n" +
		"    fix:      " + GatewayAPIInstall
	if err.Error() != want {
		t.Errorf("error:\n%s\nwant:\n%s", err, want)
	}
	if len(c.writes) != 0 {
		t.Errorf("the refused install wrote: %v", c.writes)
	}
}

// Every preflight problem at once, one line each with its fix.
func TestPreflightProblems(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(c *cluster)
		want  []string
	}{
		{"no namespace", func(c *cluster) {
			_ = c.kube.Tracker().Delete(schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}, "", "shop")
		},
			[]string{"namespace   namespace shop does not exist", "fix:      kubectl create namespace shop && kubectl label namespace shop istio.io/dataplane-mode=ambient"}},
		{"no istio", func(c *cluster) { c.apis = c.apis[:2] },
			[]string{"istio-crds  the cluster does not serve security.istio.io/v1 authorizationpolicies (its CRDs are not installed)"}},
		{"no istiod, no ambient", func(c *cluster) {
			_ = c.kube.Tracker().Delete(schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, "shop", "istio-ca-root-cert")
			_ = c.dyn.Tracker().Delete(gvrGatewayClass, "", "istio-waypoint")
		}, []string{"2 problem(s)", "istiod      no ConfigMap istio-ca-root-cert in shop: istiod is not running, or does not watch this namespace",
			"ambient     no GatewayClass istio-waypoint: istiod runs without ambient mode (PILOT_ENABLE_AMBIENT)"}},
		{"no access", func(c *cluster) {
			c.denied["create deployments"], c.denied["delete deployments"], c.denied["patch services"] = true, true, true
		},
			[]string{"3 problem(s)", "access      you may not create,delete deployments.apps in namespace shop",
				"fix:      ask a cluster admin for a Role in shop granting create,delete on deployments.apps (check: kubectl auth can-i create deployments.apps -n shop)",
				"access      you may not patch services in namespace shop", "access      you may not patch services/web in namespace shop"}},
		{"no access in the root namespace", func(c *cluster) {
			c.denied["create roles istio-system"], c.denied["get configmaps/istio istio-system"] = true, true
		},
			[]string{"2 problem(s)", "access      you may not get configmaps/istio in namespace istio-system",
				"fix:      ask a cluster admin for a Role in istio-system granting get on configmaps/istio (check: kubectl auth can-i get configmaps/istio -n istio-system)",
				"access      you may not create roles.rbac.authorization.k8s.io in namespace istio-system"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t)
			tc.setup(c)
			err := c.installer().Install(context.Background(), []Target{{Service: "web"}})
			if err == nil {
				t.Fatal("installed")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%s", w, err)
				}
			}
			if len(c.writes) != 0 {
				t.Errorf("the refused install wrote: %v", c.writes)
			}
		})
	}
}

// A write failing after the first leaves nothing of this install behind; --keep-partial keeps it.
func TestInstallRollsBack(t *testing.T) {
	c := newCluster(t)
	c.failOn["services"] = apierrors.NewForbidden(schema.GroupResource{Resource: "services"}, "detour", errors.New("quota"))
	in := c.installer()
	err := in.Install(context.Background(), []Target{{Service: "web"}})
	if err == nil || !strings.Contains(err.Error(), "mesh: applying Service shop/detour: ") ||
		!strings.Contains(err.Error(), "mesh: removed what this install wrote: CustomResourceDefinition debugsessions.detour.dev, ServiceAccount detour,") {
		t.Fatalf("install: %v", err)
	}
	if len(c.applied) < 5 {
		t.Fatalf("only %v applied before the failure", c.applied)
	}
	if left := c.left(in); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}

	c = newCluster(t)
	c.failOn["gateways"] = errors.New("webhook says no")
	in = c.installer()
	in.KeepPartial = true
	err = in.Install(context.Background(), nil)
	if err == nil || !strings.Contains(err.Error(), "kept what this install wrote (--keep-partial)") {
		t.Fatalf("install: %v", err)
	}
	if left := c.left(in); len(left) != 12 {
		t.Errorf("kept %v, want the 12 objects before the Gateway", left)
	}
}

// A waypoint whose pods cannot pull the image fails the wait at once, and the rollback undoes
// the binding too: the service has its labels of before.
func TestInstallWaitFailsOnImagePullAndUnbinds(t *testing.T) {
	c := newCluster(t)
	c.kube.Tracker().Add(&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "detour", Namespace: "shop"}})
	c.kube.Tracker().Add(&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "detour-1", Namespace: "shop", Labels: map[string]string{"app.kubernetes.io/name": "detour"}},
		Status: corev1.PodStatus{ContainerStatuses: []corev1.ContainerStatus{{Name: "detour", Image: "example.test/detour:v1",
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ImagePullBackOff", Message: "Back-off pulling image"}}}}}})
	in := c.installer()
	in.Wait = true
	var progress []string
	in.Progress = func(s string) { progress = append(progress, s) }
	err := in.Install(context.Background(), []Target{{Service: "web"}})
	if err == nil || !strings.Contains(err.Error(), "mesh: waypoint shop/detour cannot start: pod detour-1 cannot pull image example.test/detour:v1: ImagePullBackOff Back-off pulling image") ||
		!strings.Contains(err.Error(), "the binding of svc/web") {
		t.Fatalf("install: %v", err)
	}
	if left := c.left(in); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
	web, err := c.dyn.Resource(gvrService).Namespace("shop").Get(context.Background(), "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l, a := web.GetLabels(), web.GetAnnotations(); len(l) != 1 || l["app"] != "web" || len(a) != 0 {
		t.Errorf("web after the rollback: labels %v annotations %v", l, a)
	}
	if len(progress) == 0 || progress[len(progress)-1] != "bound svc/web" {
		t.Errorf("progress: %q", progress)
	}
}

func TestReleaseImage(t *testing.T) {
	for v, want := range map[string]string{
		"v1.2.3": "ghcr.io/detour-mesh/detour:v1.2.3", "v1.2.3-rc.1": "ghcr.io/detour-mesh/detour:v1.2.3-rc.1",
		"dev": "", "v1.2.3-4-gabc1234": "", "v1.2.3-dirty": "", "b5f2352": "", "1.2.3": "",
	} {
		if got := ReleaseImage(v); got != want {
			t.Errorf("ReleaseImage(%q) = %q, want %q", v, got, want)
		}
	}
}

// The waypoint may read istiod's mesh config ConfigMap in the root namespace (extensionProviders
// for CUSTOM policies) and nothing else there: a Role and RoleBinding there, named per
// installation; the config names the root namespace; uninstall removes both.
func TestInstallMeshConfigAccess(t *testing.T) {
	c := newCluster(t)
	in := c.installer()
	in.RootNamespace = "istio-root"
	shop := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": "shop"}}}
	if err := c.dyn.Tracker().Create(gvrNamespace, shop, ""); err != nil {
		t.Fatal(err)
	}
	if err := in.Install(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	role, err := c.dyn.Resource(gvrRole).Namespace("istio-root").Get(context.Background(), "detour:shop:detour", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rules, _ := json.Marshal(role.Object["rules"])
	if want := `[{"apiGroups":[""],"resourceNames":["istio"],"resources":["configmaps"],"verbs":["get","list","watch"]},` +
		`{"apiGroups":["networking.istio.io"],"resources":["destinationrules","envoyfilters"],"verbs":["get","list","watch"]},` +
		`{"apiGroups":["extensions.istio.io"],"resources":["wasmplugins","trafficextensions"],"verbs":["get","list","watch"]},` +
		`{"apiGroups":["telemetry.istio.io"],"resources":["telemetries"],"verbs":["get","list","watch"]}]`; string(rules) != want {
		t.Errorf("rules %s, want %s", rules, want)
	}
	rb, err := c.dyn.Resource(gvrRoleBinding).Namespace("istio-root").Get(context.Background(), "detour:shop:detour", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	binding, _ := json.Marshal(map[string]any{"roleRef": rb.Object["roleRef"], "subjects": rb.Object["subjects"]})
	if want := `{"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"Role","name":"detour:shop:detour"},"subjects":[{"kind":"ServiceAccount","name":"detour","namespace":"shop"}]}`; string(binding) != want {
		t.Errorf("binding %s, want %s", binding, want)
	}
	cm, err := c.dyn.Resource(schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}).Namespace("shop").Get(context.Background(), "detour", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg, _, _ := unstructured.NestedString(cm.Object, "data", "config.yaml"); !strings.Contains(cfg, "waypoint: {namespace: shop, gateway: detour, rootNamespace: istio-root}") {
		t.Errorf("config:\n%s", cfg)
	}
	if err := in.Uninstall(context.Background()); err != nil {
		t.Fatal(err)
	}
	if left := c.left(in); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
}

// A VirtualService on the service to bind refuses the bind, naming it, before anything is
// written; --force binds anyway. One in another namespace, or for another host, does not count.
func TestInstallRefusesUnsupportedConfig(t *testing.T) {
	vs := func(ns, name, host string) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
			"metadata": map[string]any{"name": name, "namespace": ns}, "spec": map[string]any{"hosts": []any{host}}}}
	}
	c := newCluster(t)
	tr := c.dyn.Tracker()
	for _, o := range []*unstructured.Unstructured{vs("shop", "web-canary", "web"), vs("other", "elsewhere", "web"), vs("shop", "api", "api.shop.svc.cluster.local")} {
		if err := tr.Create(gvrVirtualService, o, o.GetNamespace()); err != nil {
			t.Fatal(err)
		}
	}
	in := c.installer()
	err := in.Install(context.Background(), []Target{{Service: "web"}})
	if err == nil || !strings.Contains(err.Error(), "VirtualService shop/web-canary (on shop/web)") || !strings.Contains(err.Error(), "--force") ||
		strings.Contains(err.Error(), "elsewhere") || strings.Contains(err.Error(), "shop/api") {
		t.Fatalf("install --bind svc/web: %v", err)
	}
	if len(c.applied) != 0 {
		t.Fatalf("refused, yet applied %v", c.applied)
	}
	in.Force = true
	if err := in.Install(context.Background(), []Target{{Service: "web"}}); err != nil {
		t.Fatalf("install --bind svc/web --force: %v", err)
	}
}

// A mesh-wide EnvoyFilter (no selector) in the mesh's root namespace refuses the bind: the check
// reads the installer's root namespace, not istio-system whatever it is.
func TestInstallRefusesRootNamespaceConfig(t *testing.T) {
	c := newCluster(t)
	ef := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
		"metadata": map[string]any{"name": "mesh-wide", "namespace": "istio-root"}, "spec": map[string]any{}}}
	if err := c.dyn.Tracker().Create(gvrEnvoyFilter, ef, "istio-root"); err != nil {
		t.Fatal(err)
	}
	in := c.installer()
	in.RootNamespace = "istio-root"
	err := in.Install(context.Background(), []Target{{Service: "web"}})
	if err == nil || !strings.Contains(err.Error(), "EnvoyFilter istio-root/mesh-wide (on shop/web)") {
		t.Fatalf("install --bind svc/web with a mesh-wide EnvoyFilter in the root namespace: %v", err)
	}
}

// The Deployment's grace period covers the drain its own config document asks for (the
// document decoded as the waypoint decodes it, defaults included), with the 5s to spare.
func TestInstallGracePeriodCoversTheDrain(t *testing.T) {
	in := &Installer{Namespace: "shop"}
	var grace int64
	var doc string
	for _, o := range in.Objects() {
		switch o.Body["kind"] {
		case "Deployment":
			g, ok, err := unstructured.NestedFieldNoCopy(o.Body, "spec", "template", "spec", "terminationGracePeriodSeconds")
			if !ok || err != nil {
				t.Fatalf("no terminationGracePeriodSeconds: %v", err)
			}
			grace = int64(g.(int))
		case "ConfigMap":
			doc, _, _ = unstructured.NestedString(o.Body, "data", "config.yaml")
		}
	}
	cfg, err := config.Decode([]byte(doc))
	if err != nil {
		t.Fatalf("the installed config: %v\n%s", err, doc)
	}
	d := cfg.Waypoint.Drain
	if need := d.Period.Duration + d.Timeout.Duration + 5*time.Second; time.Duration(grace)*time.Second < need {
		t.Fatalf("terminationGracePeriodSeconds %d < drain period %s + timeout %s + 5s", grace, d.Period, d.Timeout)
	}
}

func gvrRoute(resource string) schema.GroupVersionResource {
	return schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: resource}
}

// An HTTPRoute on the service to bind with a filter detour does not handle (ExtensionRef)
// refuses the bind, naming the route and the field; --force binds anyway.
func TestInstallRefusesUnsupportedRoute(t *testing.T) {
	c := newCluster(t)
	hr := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
		"metadata": map[string]any{"name": "ext", "namespace": "shop"},
		"spec": map[string]any{"parentRefs": []any{map[string]any{"group": "", "kind": "Service", "name": "web"}},
			"rules": []any{map[string]any{"filters": []any{map[string]any{"type": "ExtensionRef",
				"extensionRef": map[string]any{"group": "example.com", "kind": "Thing", "name": "x"}}}}}}}}
	if err := c.dyn.Tracker().Create(gvrRoute("httproutes"), hr, "shop"); err != nil {
		t.Fatal(err)
	}
	in := c.installer()
	err := in.Install(context.Background(), []Target{{Service: "web"}})
	if err == nil || !strings.Contains(err.Error(), "HTTPRoute shop/ext (on shop/web): not applied") ||
		!strings.Contains(err.Error(), "spec.rules[0].filters[0].extensionRef is not a field detour knows of Filter") {
		t.Fatalf("install --bind svc/web with an ExtensionRef route: %v", err)
	}
	in.Force = true
	if err := in.Install(context.Background(), []Target{{Service: "web"}}); err != nil {
		t.Fatalf("install --bind svc/web --force: %v", err)
	}
}

// doctor svc/NAME reads the root namespace it is given (--root-namespace): a mesh-wide
// Telemetry with tracing there fails the unsupported check, naming it.
func TestDoctorUnsupportedInRootNamespace(t *testing.T) {
	c := newCluster(t)
	tel := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
		"metadata": map[string]any{"name": "tracing", "namespace": "istio-root"}, "spec": map[string]any{"tracing": []any{map[string]any{}}}}}
	if err := c.dyn.Tracker().Create(gvrTelemetry, tel, "istio-root"); err != nil {
		t.Fatal(err)
	}
	d := &Doctor{Dynamic: c.dyn, Namespace: "shop", Service: "web", RootNamespace: "istio-root"}
	var got []string
	d.checkUnsupported(context.Background(), func(f Finding) { got = append(got, fmt.Sprint(f.OK, " ", f.Say)) })
	if len(got) != 1 || !strings.HasPrefix(got[0], "false 1 Istio object(s)") ||
		!strings.Contains(got[0], "Telemetry istio-root/tracing (on shop/web): tracing (the mesh's default provider) is not done") {
		t.Errorf("findings: %q", got)
	}
}
