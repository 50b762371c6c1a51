// Package mesh tests detour's Kubernetes side against the real test bed (kube-apiserver and
// istiod).
package mesh

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

func ptr[T any](v T) *T { return &v }

// within polls cond and reports how long it took to hold (fails the test after 5 s).
func within(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		// A hang guard, not a measure (the times are logged): generous for a loaded CI machine.
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%s: not reflected within 5 s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// startDiscovery runs d on a goroutine of the test's: its cleanup stops Run and waits for it
// to return.
func startDiscovery(ctx context.Context, t *testing.T, d *mesh.Discovery) {
	t.Helper()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- d.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-done })
}

// runDiscovery starts d and waits for its first sync (a hang guard of 30 s).
func runDiscovery(ctx context.Context, t *testing.T, d *mesh.Discovery) {
	t.Helper()
	startDiscovery(ctx, t, d)
	deadline := time.Now().Add(30 * time.Second)
	for !d.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("discovery never synced")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Services, EndpointSlices, Pods, Namespaces and AuthorizationPolicies created, updated and
// deleted on the API server show in the route table and policy engine within 1 s; only services
// bound to this waypoint (istio.io/use-waypoint, Istio's rules) are routable, and the waypoint's
// own Service and replicas are known as itself.
func TestDiscovery(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "shop"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct{ name, sa, ip string }{{"web-1", "web", "10.244.7.1"}, {"web-2", "web", "10.244.7.2"}} {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: ns},
			Spec: corev1.PodSpec{ServiceAccountName: p.sa, Containers: []corev1.Container{{Name: "app", Image: "none.invalid/app"}}}}
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns, Labels: map[string]string{mesh.UseWaypoint: "detour"}},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP, AppProtocol: ptr("http")},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddr(svc.Spec.ClusterIP)
	endpoint := func(name, ip string) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: name}}
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{endpoint("web-1", "10.244.7.1")},
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	if slice, err = c.Client.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	d := &mesh.Discovery{Kube: c.Client, Istio: ic, Waypoint: authz.Waypoint{Namespace: ns, Gateway: "detour"}}
	if d.Policies().Decide(&authz.Request{}).Allow {
		t.Fatal("before the first sync the policy engine must refuse everything")
	}
	runDiscovery(ctx, t, d)
	target := netip.AddrPortFrom(vip, 80)
	resolve := func() *route.Destination {
		dest, _ := d.Routes().Resolve(target, nil)
		return dest
	}
	dest := resolve()
	if dest == nil || len(dest.Candidates) != 1 || dest.Candidates[0].String() != "10.244.7.1:8080" || dest.Port.AppProtocol != "http" ||
		dest.Service.Endpoints[0].ServiceAccount != "web" {
		t.Fatalf("first sync: %+v", dest)
	}
	var took []string
	note := func(what string, d time.Duration) { took = append(took, what+" "+d.Round(time.Millisecond).String()) }

	slice.Endpoints = append(slice.Endpoints, endpoint("web-2", "10.244.7.2"))
	if slice, err = c.Client.DiscoveryV1().EndpointSlices(ns).Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	note("endpoint added", within(t, "a new endpoint", func() bool { d := resolve(); return d != nil && len(d.Candidates) == 2 }))

	slice.Endpoints[0].Conditions.Ready = ptr(false)
	if _, err = c.Client.DiscoveryV1().EndpointSlices(ns).Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	note("endpoint not ready", within(t, "an endpoint going unready", func() bool { d := resolve(); return d != nil && len(d.Candidates) == 1 }))

	evil := &authz.Request{Principal: "cluster.local/ns/evil/sa/x", Service: authz.Service{Namespace: ns, Name: "web"}, DestPort: 80}
	if !d.Policies().Decide(evil).Allow {
		t.Fatal("no policy yet, yet denied")
	}
	ap := &istiosec.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "no-evil", Namespace: ns},
		Spec: secv1beta1.AuthorizationPolicy{
			Action:     secv1beta1.AuthorizationPolicy_DENY,
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
			Rules:      []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Namespaces: []string{"evil"}}}}}},
		}}
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx, ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	note("policy created", within(t, "a new DENY policy", func() bool { return !d.Policies().Decide(evil).Allow }))
	// istio.io/dry-run: the same DENY is evaluated and reported, never enforced; and back.
	dryRun := func(on bool) {
		t.Helper()
		cur, err := ic.SecurityV1().AuthorizationPolicies(ns).Get(ctx, "no-evil", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cur.Annotations = map[string]string{authz.DryRunAnnotation: "true"}
		if !on {
			cur.Annotations = nil
		}
		if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dryRun(true)
	note("policy made dry-run", within(t, "a DENY made dry-run", func() bool {
		dec := d.Policies().Decide(evil)
		return dec.Allow && len(dec.DryRun) == 1 && dec.DryRun[0] == ns+"/no-evil: deny"
	}))
	dryRun(false)
	note("dry-run removed", within(t, "a dry-run DENY enforced again", func() bool { return !d.Policies().Decide(evil).Allow }))
	if err := ic.SecurityV1().AuthorizationPolicies(ns).Delete(ctx, "no-evil", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	note("policy deleted", within(t, "a deleted policy", func() bool { return d.Policies().Decide(evil).Allow }))

	bindingSteps(t, ctx, c, d, note)

	if err := c.Client.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	note("service deleted", within(t, "a deleted service", func() bool {
		_, err := d.Routes().Resolve(target, nil)
		return errors.Is(err, route.ErrUnknownTarget)
	}))
	t.Logf("reflected after: %s", strings.Join(took, ", "))
}

// bindingSteps: which services the waypoint shop/detour serves, as labels change.
func bindingSteps(t *testing.T, ctx context.Context, c *testbed.Cluster, d *mesh.Discovery, note func(string, time.Duration)) {
	t.Helper()
	port := []testbed.ServicePort{{Name: "tcp", Port: 80, TargetPort: 8080}}
	svc := func(ns, name string, labels map[string]string, ips ...string) netip.AddrPort {
		t.Helper()
		s, err := c.Service(ctx, ns, name, labels, port, ips...)
		if err != nil {
			t.Fatal(err)
		}
		return netip.AddrPortFrom(netip.MustParseAddr(s.Spec.ClusterIP), 80)
	}
	bound := func(target netip.AddrPort) func() bool {
		return func() bool { _, err := d.Routes().Resolve(target, nil); return err == nil }
	}
	notBound := func(target netip.AddrPort) func() bool {
		return func() bool { _, err := d.Routes().Resolve(target, nil); return errors.Is(err, route.ErrNotBound) }
	}
	if err := c.Namespace(ctx, "other", nil); err != nil {
		t.Fatal(err)
	}
	api := svc("shop", "api", nil, "10.244.7.10")
	note("unlabelled service not bound", within(t, "an unlabelled service refused", notBound(api)))
	// Its EndpointSlice is written after the Service: its pod is refused too once that is seen.
	within(t, "a pod of an unbound service, addressed directly", notBound(netip.AddrPortFrom(netip.MustParseAddr("10.244.7.10"), 8080)))
	cross := svc("other", "db", map[string]string{mesh.UseWaypoint: "detour", mesh.UseWaypointNamespace: "shop"}, "10.244.7.11")
	elsewhere := svc("other", "cache", map[string]string{mesh.UseWaypoint: "detour"}, "10.244.7.12") // other/detour
	note("cross-namespace binding", within(t, "use-waypoint-namespace", bound(cross)))
	within(t, "another namespace's waypoint of the same name", notBound(elsewhere))
	optOut := svc("shop", "legacy", map[string]string{mesh.UseWaypoint: "none"}, "10.244.7.13")

	nsObj, err := c.Client.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if nsObj.Labels == nil {
		nsObj.Labels = map[string]string{}
	}
	nsObj.Labels[mesh.UseWaypoint] = "detour"
	if _, err := c.Client.CoreV1().Namespaces().Update(ctx, nsObj, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	note("namespace labelled", within(t, "a service bound by its namespace", bound(api)))
	within(t, "use-waypoint: none on the service", notBound(optOut))

	own := svc("shop", "detour", nil, "10.244.7.50", "10.244.7.51") // the Gateway's address: detour.shop.svc.cluster.local
	within(t, "the waypoint's own Service", func() bool {
		r := d.Routes()
		return r.IsSelf(own.Addr()) && r.IsSelf(netip.MustParseAddr("10.244.7.51")) && !r.IsSelf(api.Addr())
	})
}
