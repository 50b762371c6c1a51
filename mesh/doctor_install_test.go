package mesh

import (
	"context"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	fakediscovery "k8s.io/client-go/discovery/fake"
	kubefake "k8s.io/client-go/kubernetes/fake"
)

func waypointDeployment(image, version string) *appsv1.Deployment {
	return &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "detour", Namespace: "shop", Labels: map[string]string{VersionLabel: version}},
		Spec: appsv1.DeploymentSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "detour", Image: image}}}}}}
}

// The doctor names missing CRDs, a pod that cannot pull its image, and a waypoint of another
// version than the CLI, each with its fix.
func TestDoctorInstallChecks(t *testing.T) {
	kube := kubefake.NewClientset(waypointDeployment("ghcr.io/detour-mesh/detour:v1.0.0", "v1.0.0"),
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "detour-1", Namespace: "shop", Labels: map[string]string{"app.kubernetes.io/name": "detour"}},
			Status: corev1.PodStatus{ContainerStatuses: []corev1.ContainerStatus{{Name: "detour", Image: "ghcr.io/detour-mesh/detour:v1.0.0",
				State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ErrImagePull", Message: "not found"}}}}}})
	kube.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{
		{GroupVersion: "security.istio.io/v1", APIResources: []metav1.APIResource{{Name: "authorizationpolicies"}}}}
	d := &Doctor{Kube: kube, Namespace: "shop", Version: "v1.1.0"}
	var got []string
	d.checkInstall(context.Background(), func(f Finding) { got = append(got, f.Check+" "+f.Say+" | "+f.Fix) })
	want := []string{
		"crds the cluster does not serve gateways.gateway.networking.k8s.io, debugsessions.detour.dev (CRDs not installed) | " + GatewayAPIInstall,
		"image pod detour-1 cannot pull image ghcr.io/detour-mesh/detour:v1.0.0: ErrImagePull not found | detour install -n shop --image REF",
		"version the waypoint runs detour v1.0.0 (image ghcr.io/detour-mesh/detour:v1.0.0), the CLI is v1.1.0: the CLI and the waypoint may disagree on the tunnel protocol | detour install -n shop with this CLI (upgrades the waypoint to v1.1.0)",
	}
	if len(got) != len(want) {
		t.Fatalf("findings:\n%s", strings.Join(got, "\n"))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("finding %d:\n%s\nwant prefix:\n%s", i, got[i], want[i])
		}
	}
}

// A custom image is compared by the label the installing CLI wrote; the same version is fine.
func TestDoctorVersion(t *testing.T) {
	for _, tc := range []struct{ image, label, cli, want string }{
		{"registry.example/detour:x", "v1.0.0", "v1.0.0", "ok the waypoint runs detour v1.0.0, the CLI's version"},
		{"registry.example/detour:x", "", "v1.0.0", "ok the waypoint's version is unknown"},
		{"registry.example/detour:x", "v0.9.0", "dev", "FAIL the waypoint runs detour v0.9.0 (installed by detour v0.9.0), the CLI is dev"},
	} {
		d := &Doctor{Namespace: "shop", Version: tc.cli}
		var got string
		d.checkVersion(tc.label, tc.image, func(f Finding) {
			mark := "FAIL"
			if f.OK {
				mark = "ok"
			}
			got = mark + " " + f.Say
		})
		if !strings.HasPrefix(got, tc.want) {
			t.Errorf("%+v: %q", tc, got)
		}
	}
}
