package mesh_test

import (
	"context"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"github.com/detour-mesh/detour/mesh"
)

// The waypoint of a service, as istiod resolves it: the service's label, else its namespace's;
// none on the service is final; use-waypoint-namespace moves it.
func TestFindWaypoint(t *testing.T) {
	obj := func(labels map[string]string) metav1.ObjectMeta { return metav1.ObjectMeta{Labels: labels} }
	ns := func(name string, labels map[string]string) *corev1.Namespace {
		o := obj(labels)
		o.Name = name
		return &corev1.Namespace{ObjectMeta: o}
	}
	svc := func(namespace, name string, labels map[string]string) *corev1.Service {
		o := obj(labels)
		o.Name, o.Namespace = name, namespace
		return &corev1.Service{ObjectMeta: o}
	}
	kube := kubefake.NewClientset(
		ns("shop", map[string]string{mesh.UseWaypoint: "ns-wp"}),
		ns("plain", nil),
		svc("shop", "web", nil),
		svc("shop", "cart", map[string]string{mesh.UseWaypoint: "detour"}),
		svc("shop", "pay", map[string]string{mesh.UseWaypoint: "detour", mesh.UseWaypointNamespace: "mesh"}),
		svc("shop", "db", map[string]string{mesh.UseWaypoint: "none"}),
		svc("plain", "web", nil),
	)
	for _, tc := range []struct {
		ns, svc string
		want    mesh.WaypointRef
		err     string
	}{
		{ns: "shop", svc: "web", want: mesh.WaypointRef{Namespace: "shop", Name: "ns-wp", From: "namespace shop's istio.io/use-waypoint"}},
		{ns: "shop", svc: "cart", want: mesh.WaypointRef{Namespace: "shop", Name: "detour", From: "service shop/cart's istio.io/use-waypoint"}},
		{ns: "shop", svc: "pay", want: mesh.WaypointRef{Namespace: "mesh", Name: "detour", From: "service shop/pay's istio.io/use-waypoint and istio.io/use-waypoint-namespace"}},
		{ns: "shop", svc: "db", err: "mesh: service shop/db has istio.io/use-waypoint=none: its traffic goes through no waypoint, so no session can take it; give --waypoint or --port-forward to use one anyway"},
		{ns: "plain", svc: "web", err: "mesh: service plain/web uses no waypoint (neither it nor its namespace has istio.io/use-waypoint): bind it (detour install --bind, or kubectl label), or give --waypoint or --port-forward"},
		{ns: "shop", svc: "gone", err: `mesh: finding the waypoint of shop/gone: services "gone" not found`},
	} {
		got, err := mesh.FindWaypoint(context.Background(), kube, tc.ns, tc.svc)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%s/%s: %+v, %v, want %q", tc.ns, tc.svc, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s/%s: %+v, %v, want %+v", tc.ns, tc.svc, got, err, tc.want)
		}
	}
}

// Shell completion's listings: sorted names.
func TestNames(t *testing.T) {
	kube := kubefake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default"}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "cart", Namespace: "shop"}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "other", Namespace: "default"}},
	)
	ns, err := mesh.NamespaceNames(context.Background(), kube)
	if err != nil || !slices.Equal(ns, []string{"default", "shop"}) {
		t.Errorf("namespaces: %v, %v", ns, err)
	}
	svcs, err := mesh.ServiceNames(context.Background(), kube, "shop")
	if err != nil || !slices.Equal(svcs, []string{"cart", "web"}) {
		t.Errorf("services: %v, %v", svcs, err)
	}
}
