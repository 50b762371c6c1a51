package mesh

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// TargetEnv reads what the rules need, and only that: the Running pod's references, the
// namespace's Services (those created before the container started), the node when a limit
// defaults to its allocatable; a kubeconfig that may not read default/kubernetes leaves its
// links out and says so.
func TestTargetEnvReads(t *testing.T) {
	start := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	svc := func(name, ns, ip string, created time.Time, selector map[string]string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, CreationTimestamp: metav1.NewTime(created)},
			Spec: corev1.ServiceSpec{ClusterIP: ip, Selector: selector, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}
	}
	pod := func(name string, phase corev1.PodPhase) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", Labels: map[string]string{"app": "web"}},
			Spec: corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "web", Env: []corev1.EnvVar{
				{Name: "GREETING", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "web"}, Key: "greeting"}}},
				{Name: "MEM", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory", Divisor: resource.MustParse("1Mi")}}},
			}}}},
			Status: corev1.PodStatus{Phase: phase, ContainerStatuses: []corev1.ContainerStatus{{Name: "web",
				State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(start)}}}}}}
	}
	kube := kubefake.NewClientset(
		svc("web", "shop", "10.96.0.10", start.Add(-time.Hour), map[string]string{"app": "web"}),
		svc("later", "shop", "10.96.0.11", start.Add(time.Minute), nil),
		svc("kubernetes", "default", "10.96.0.1", start.Add(-time.Hour), nil),
		pod("web-0", corev1.PodPending), pod("web-1", corev1.PodRunning),
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"}, Data: map[string]string{"greeting": "hi"}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Status: corev1.NodeStatus{Allocatable: corev1.ResourceList{"memory": resource.MustParse("2Gi")}}},
	)
	env, err := TargetEnv(context.Background(), kube, "shop", "web", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"GREETING=hi", "MEM=2048", "WEB_SERVICE_HOST=10.96.0.10", "WEB_SERVICE_PORT_HTTP=80", "KUBERNETES_SERVICE_HOST=10.96.0.1"} {
		if !slices.Contains(env.Vars, want) {
			t.Errorf("no %s in %q", want, env.Vars)
		}
	}
	if env.Pod != "web-1" || slices.ContainsFunc(env.Vars, func(kv string) bool { return strings.HasPrefix(kv, "LATER_") }) || len(env.Unset) != 0 {
		t.Errorf("pod %s, vars %q, unset %q: want web-1's, no LATER_ (created after the container started), nothing unset", env.Pod, env.Vars, env.Unset)
	}

	kube.PrependReactor("get", "services", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetNamespace() == "default" {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "services"}, "kubernetes", nil)
		}
		return false, nil, nil
	})
	env, err = TargetEnv(context.Background(), kube, "shop", "web", "")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"KUBERNETES_SERVICE_HOST, KUBERNETES_PORT and the rest of the kubernetes Service's links (your kubeconfig may not read service default/kubernetes)"}
	if !slices.Equal(env.Unset, want) || slices.ContainsFunc(env.Vars, func(kv string) bool { return strings.HasPrefix(kv, "KUBERNETES_") }) {
		t.Errorf("default/kubernetes forbidden: unset %q, vars %q", env.Unset, env.Vars)
	}
	if _, err := TargetEnv(context.Background(), kube, "shop", "web", "sidecar"); err == nil || err.Error() != `mesh: pod web-1 has no container "sidecar"; --container takes one of web` {
		t.Errorf("unknown container: %v", err)
	}
}
