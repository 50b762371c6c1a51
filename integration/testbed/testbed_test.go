package testbed_test

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/integration/testbed"
)

func TestKubeAPIServer(t *testing.T) {
	c := testbed.Start(t, testbed.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	v, err := c.Client.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kube-apiserver %s", v.GitVersion)
}

func TestIstiod(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	t.Logf("istiod ready at %s, CA root %s", c.Istiod.HTTPAddr, c.Istiod.Root.Subject)
}

// A Gateway of class istio-waypoint addressed by a Service hostname becomes the waypoint of a
// Service labelled istio.io/use-waypoint, in the view istiod sends ztunnel; removing the label
// removes it.
func TestWaypointRegistration(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "demo"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Service(ctx, ns, "detour", nil, []testbed.ServicePort{{Name: "mesh", Port: 15008, TargetPort: 15008}}, "10.244.0.10"); err != nil {
		t.Fatal(err)
	}
	if err := c.Waypoint(ctx, ns, "detour", "detour.demo.svc.cluster.local", "service"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Service(ctx, ns, "echo", map[string]string{"istio.io/use-waypoint": "detour"}, []testbed.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}, "10.244.0.20"); err != nil {
		t.Fatal(err)
	}
	err := c.WaitAmbient(ctx, ns, "echo", time.Minute, func(s *testbed.AmbientService) bool {
		return s != nil && s.WaypointHost() == "detour.demo.svc.cluster.local" && s.Waypoint.HboneMtlsPort == 15008
	})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, "echo", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	delete(svc.Labels, "istio.io/use-waypoint")
	if _, err := c.Client.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	err = c.WaitAmbient(ctx, ns, "echo", time.Minute, func(s *testbed.AmbientService) bool {
		return s != nil && s.WaypointHost() == ""
	})
	if err != nil {
		t.Fatal(err)
	}
}
