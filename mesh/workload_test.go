package mesh

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Workload names as Istio derives them for its telemetry labels (istio pkg/kube/util.go
// GetDeployMetaFromPod, pkg/kube/labels/labels.go CanonicalService).
func TestPodWorkload(t *testing.T) {
	yes := true
	owned := func(kind, name string, labels map[string]string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name + "-x7k2p", GenerateName: name + "-", Namespace: "demo", Labels: labels,
			OwnerReferences: []metav1.OwnerReference{{Kind: kind, Name: name, Controller: &yes}}}}
	}
	for _, c := range []struct {
		name                      string
		pod                       *corev1.Pod
		workload, canonical, rev  string
		app, version, serviceAcct string
	}{
		{"deployment", owned("ReplicaSet", "reviews-v2-5d8f9c7b6", map[string]string{"pod-template-hash": "5d8f9c7b6", "app": "reviews", "version": "v2"}),
			"reviews-v2", "reviews", "v2", "reviews", "v2", "default"},
		{"replicaset without hash", owned("ReplicaSet", "plain", nil), "plain", "plain", "latest", "", "", "default"},
		{"cronjob", owned("Job", "report-28912345", map[string]string{"app.kubernetes.io/name": "report"}), "report", "report", "latest", "", "", "default"},
		{"job", owned("Job", "migrate", nil), "migrate", "migrate", "latest", "", "", "default"},
		{"bare pod", &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "sleep", Namespace: "demo"}, Spec: corev1.PodSpec{ServiceAccountName: "sleep"}},
			"sleep", "sleep", "latest", "", "", "sleep"},
		{"canonical labels win", owned("ReplicaSet", "web-abc12", map[string]string{"pod-template-hash": "abc12", "app": "web", "version": "v1",
			"service.istio.io/canonical-name": "frontend", "service.istio.io/canonical-revision": "r7"}), "web", "frontend", "r7", "web", "v1", "default"},
		{"workload-name label", owned("ReplicaSet", "web-abc12", map[string]string{"pod-template-hash": "abc12", "service.istio.io/workload-name": "edge"}),
			"edge", "edge", "latest", "", "", "default"},
	} {
		w := podWorkload(c.pod)
		if w.Name != c.workload || w.CanonicalService != c.canonical || w.CanonicalRevision != c.rev || w.App != c.app ||
			w.Version != c.version || w.ServiceAccount != c.serviceAcct || w.Namespace != "demo" {
			t.Errorf("%s: got %+v", c.name, *w)
		}
	}
}
