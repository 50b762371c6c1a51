package mesh

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
)

// Env is a container's environment as the kubelet made it, read from outside the pod.
type Env struct {
	Pod, Container string
	Vars           []string // NAME=VALUE, sorted by name
	// Unset names the variables the pod has that detour could not read, each with why: a
	// fileKeyRef (read by the kubelet inside the pod), the kubernetes Service's links when the
	// kubeconfig may not read default/kubernetes.
	Unset []string
}

// TargetEnv is the environment of a container (the first, or the one named) of a Running pod
// that the service selects (a Ready one first, then by name), made by the kubelet's rules
// (envInput.environment) from what it read: the pod, its ConfigMaps and Secrets, the Services for
// the service links (those created before the container started), the node's allocatable when
// a resourceFieldRef needs it. Everything is read with the user's own permissions.
func TargetEnv(ctx context.Context, kube kubernetes.Interface, ns, svcName, container string) (*Env, error) {
	svc, err := kube.CoreV1().Services(ns).Get(ctx, svcName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("mesh: target svc/%s in %s: %w", svcName, ns, err)
	}
	if len(svc.Spec.Selector) == 0 {
		return nil, fmt.Errorf("mesh: target svc/%s in %s selects no pods (no selector): no environment to take; name a service with a selector in --target", svcName, ns)
	}
	sel := labels.SelectorFromSet(svc.Spec.Selector).String()
	pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		return nil, fmt.Errorf("mesh: listing the pods of svc/%s: %w", svcName, err)
	}
	pod, err := runningPod(pods.Items, fmt.Sprintf("svc/%s in %s", svcName, ns), fmt.Sprintf("kubectl get pods -n %s -l %s", ns, sel))
	if err != nil {
		return nil, err
	}
	ct := podContainer(pod, container)
	if ct == nil {
		return nil, fmt.Errorf("mesh: pod %s has no container %q; --container takes one of %s", pod.Name, container, strings.Join(containerNames(pod), ", "))
	}
	in := envInput{pod: pod, container: ct, started: started(pod, ct.Name)}
	env := &Env{Pod: pod.Name, Container: ct.Name}
	if in.services, env.Unset, err = linkedServices(ctx, kube, pod); err != nil {
		return nil, err
	}
	if in.configMaps, in.secrets, err = references(ctx, kube, ns, ct); err != nil {
		return nil, err
	}
	if needsAllocatable(pod, ct) {
		node, err := kube.CoreV1().Nodes().Get(ctx, pod.Spec.NodeName, metav1.GetOptions{})
		if err != nil {
			return nil, readErr("Node", "", pod.Spec.NodeName, err)
		}
		in.allocatable = node.Status.Allocatable
	}
	vars, unset, err := in.environment()
	if err != nil {
		return nil, err
	}
	env.Unset = append(env.Unset, unset...)
	for k, v := range vars {
		env.Vars = append(env.Vars, k+"="+v)
	}
	sort.Strings(env.Vars)
	return env, nil
}

// runningPod is the pod whose environment to take: Running and not being deleted, a Ready one
// first, then by name. what names the pods for the error, list how to see them.
func runningPod(pods []corev1.Pod, what, list string) (*corev1.Pod, error) {
	if len(pods) == 0 {
		return nil, fmt.Errorf("mesh: %s has no pods: its environment is the kubelet's, made for a running container; start its workload (%s)", what, list)
	}
	sort.Slice(pods, func(i, j int) bool {
		if ri, rj := podReady(&pods[i]), podReady(&pods[j]); ri != rj {
			return ri
		}
		return pods[i].Name < pods[j].Name
	})
	var seen []string
	for i := range pods {
		p := &pods[i]
		if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil {
			return p, nil
		}
		seen = append(seen, p.Name+" "+podState(p))
	}
	return nil, fmt.Errorf("mesh: no Running pod of %s (%s): its environment is the kubelet's, made for a running container; %s shows why", what, strings.Join(seen, ", "), list)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podContainer is the container named (an app container, or a sidecar: a restartable init
// container), or the first app container for "".
func podContainer(pod *corev1.Pod, name string) *corev1.Container {
	if name == "" && len(pod.Spec.Containers) > 0 {
		return &pod.Spec.Containers[0]
	}
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		if c.Name == name && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			return c
		}
	}
	return nil
}

func containerNames(pod *corev1.Pod) []string {
	var names []string
	for _, c := range pod.Spec.Containers {
		names = append(names, c.Name)
	}
	for _, c := range pod.Spec.InitContainers {
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			names = append(names, c.Name)
		}
	}
	return names
}

// started is when the container's current instance started (zero if its status does not say).
func started(pod *corev1.Pod, name string) time.Time {
	for _, list := range [][]corev1.ContainerStatus{pod.Status.ContainerStatuses, pod.Status.InitContainerStatuses} {
		for _, s := range list {
			if s.Name == name && s.State.Running != nil {
				return s.State.Running.StartedAt.Time
			}
		}
	}
	return time.Time{}
}

// linkedServices are the Services the kubelet makes service links of for pod: default's
// kubernetes, and the pod's namespace's with enableServiceLinks. A kubeconfig that may not read
// default/kubernetes leaves its variables out, said in unset.
func linkedServices(ctx context.Context, kube kubernetes.Interface, pod *corev1.Pod) (svcs []corev1.Service, unset []string, err error) {
	ns := pod.Namespace
	if pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks {
		list, err := kube.CoreV1().Services(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, nil, fmt.Errorf("mesh: listing the services of %s, whose links are in the target's environment (enableServiceLinks): %w", ns, err)
		}
		svcs = list.Items
	}
	if ns == metav1.NamespaceDefault && len(svcs) > 0 {
		return svcs, nil, nil
	}
	k, err := kube.CoreV1().Services(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	switch {
	case err == nil:
		svcs = append(svcs, *k)
	case apierrors.IsForbidden(err):
		unset = append(unset, "KUBERNETES_SERVICE_HOST, KUBERNETES_PORT and the rest of the kubernetes Service's links (your kubeconfig may not read service default/kubernetes)")
	case !apierrors.IsNotFound(err):
		return nil, nil, fmt.Errorf("mesh: reading service default/kubernetes, whose links are in every pod's environment: %w", err)
	}
	return svcs, unset, nil
}

// references reads the ConfigMaps and Secrets c's env and envFrom name; a missing one is left
// out (environment decides whether that is an error).
func references(ctx context.Context, kube kubernetes.Interface, ns string, c *corev1.Container) (map[string]*corev1.ConfigMap, map[string]*corev1.Secret, error) {
	cms, secs := map[string]bool{}, map[string]bool{}
	for _, f := range c.EnvFrom {
		if f.ConfigMapRef != nil {
			cms[f.ConfigMapRef.Name] = true
		}
		if f.SecretRef != nil {
			secs[f.SecretRef.Name] = true
		}
	}
	for _, e := range c.Env {
		if e.Value != "" || e.ValueFrom == nil {
			continue
		}
		if r := e.ValueFrom.ConfigMapKeyRef; r != nil {
			cms[r.Name] = true
		}
		if r := e.ValueFrom.SecretKeyRef; r != nil {
			secs[r.Name] = true
		}
	}
	configMaps, secrets := map[string]*corev1.ConfigMap{}, map[string]*corev1.Secret{}
	for name := range cms {
		cm, err := kube.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
		switch {
		case err == nil:
			configMaps[name] = cm
		case !apierrors.IsNotFound(err):
			return nil, nil, readErr("ConfigMap", ns, name, err)
		}
	}
	for name := range secs {
		s, err := kube.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
		switch {
		case err == nil:
			secrets[name] = s
		case !apierrors.IsNotFound(err):
			return nil, nil, readErr("Secret", ns, name, err)
		}
	}
	return configMaps, secrets, nil
}
