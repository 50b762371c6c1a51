package mesh

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
)

// ServiceResolver maps cluster service names (NAME, NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local;
// NS defaults to ns) to their cluster IPs.
func ServiceResolver(kube kubernetes.Interface, ns string) func(context.Context, string) (net.IP, error) {
	return func(ctx context.Context, host string) (net.IP, error) {
		name, rest, _ := strings.Cut(strings.TrimSuffix(host, "."), ".")
		sns := ns
		if rest != "" {
			sns, rest, _ = strings.Cut(rest, ".")
			if rest != "" && rest != "svc" && rest != "svc.cluster.local" {
				return nil, fmt.Errorf("mesh: %s is not a cluster service name", host)
			}
		}
		svc, err := kube.CoreV1().Services(sns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("mesh: resolving %s: %w", host, err)
		}
		ip := net.ParseIP(svc.Spec.ClusterIP)
		if ip == nil {
			return nil, fmt.Errorf("mesh: service %s/%s has no cluster IP (headless)", sns, name)
		}
		return ip, nil
	}
}

// TargetEnv is the environment of the service's workload: a pod the service selects, its
// container's env and envFrom, with ConfigMap and Secret references read with the user's own
// permissions.
func TargetEnv(ctx context.Context, kube kubernetes.Interface, ns, svcName, container string) ([]string, error) {
	svc, err := kube.CoreV1().Services(ns).Get(ctx, svcName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("mesh: target svc/%s in %s: %w", svcName, ns, err)
	}
	if len(svc.Spec.Selector) == 0 {
		return nil, fmt.Errorf("mesh: target svc/%s selects no pods (no selector): no environment to take", svcName)
	}
	pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: labels.SelectorFromSet(svc.Spec.Selector).String()})
	if err != nil {
		return nil, fmt.Errorf("mesh: listing the pods of svc/%s: %w", svcName, err)
	}
	if len(pods.Items) == 0 {
		return nil, fmt.Errorf("mesh: target svc/%s in %s has no pods", svcName, ns)
	}
	sort.Slice(pods.Items, func(i, j int) bool { return pods.Items[i].Name < pods.Items[j].Name })
	pod := &pods.Items[0]
	var ct *corev1.Container
	for i := range pod.Spec.Containers {
		if container == "" || pod.Spec.Containers[i].Name == container {
			ct = &pod.Spec.Containers[i]
			break
		}
	}
	if ct == nil {
		return nil, fmt.Errorf("mesh: pod %s has no container %q", pod.Name, container)
	}
	vals := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := vals[k]; !ok {
			order = append(order, k)
		}
		vals[k] = v
	}
	for _, from := range ct.EnvFrom {
		var data map[string]string
		switch {
		case from.ConfigMapRef != nil:
			cm, err := kube.CoreV1().ConfigMaps(ns).Get(ctx, from.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				if optional(from.ConfigMapRef.Optional) && apierrors.IsNotFound(err) {
					continue
				}
				return nil, readErr("ConfigMap", ns, from.ConfigMapRef.Name, err)
			}
			data = cm.Data
		case from.SecretRef != nil:
			sec, err := kube.CoreV1().Secrets(ns).Get(ctx, from.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				if optional(from.SecretRef.Optional) && apierrors.IsNotFound(err) {
					continue
				}
				return nil, readErr("Secret", ns, from.SecretRef.Name, err)
			}
			data = map[string]string{}
			for k, v := range sec.Data {
				data[k] = string(v)
			}
		}
		keys := make([]string, 0, len(data))
		for k := range data {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			set(from.Prefix+k, data[k])
		}
	}
	for _, e := range ct.Env {
		v, err := envValue(ctx, kube, pod, e)
		if err != nil {
			return nil, err
		}
		set(e.Name, v)
	}
	out := make([]string, 0, len(order))
	for _, k := range order {
		out = append(out, k+"="+vals[k])
	}
	return out, nil
}

func envValue(ctx context.Context, kube kubernetes.Interface, pod *corev1.Pod, e corev1.EnvVar) (string, error) {
	src := e.ValueFrom
	switch {
	case src == nil:
		return e.Value, nil
	case src.ConfigMapKeyRef != nil:
		cm, err := kube.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, src.ConfigMapKeyRef.Name, metav1.GetOptions{})
		if err != nil {
			if optional(src.ConfigMapKeyRef.Optional) && apierrors.IsNotFound(err) {
				return "", nil
			}
			return "", readErr("ConfigMap", pod.Namespace, src.ConfigMapKeyRef.Name, err)
		}
		return cm.Data[src.ConfigMapKeyRef.Key], nil
	case src.SecretKeyRef != nil:
		sec, err := kube.CoreV1().Secrets(pod.Namespace).Get(ctx, src.SecretKeyRef.Name, metav1.GetOptions{})
		if err != nil {
			if optional(src.SecretKeyRef.Optional) && apierrors.IsNotFound(err) {
				return "", nil
			}
			return "", readErr("Secret", pod.Namespace, src.SecretKeyRef.Name, err)
		}
		return string(sec.Data[src.SecretKeyRef.Key]), nil
	case src.FieldRef != nil:
		switch src.FieldRef.FieldPath {
		case "metadata.name":
			return pod.Name, nil
		case "metadata.namespace":
			return pod.Namespace, nil
		case "spec.serviceAccountName":
			return pod.Spec.ServiceAccountName, nil
		case "spec.nodeName":
			return pod.Spec.NodeName, nil
		case "status.podIP":
			return pod.Status.PodIP, nil
		}
	}
	return "", nil // resourceFieldRef and other fields: not meaningful on a laptop
}

func optional(b *bool) bool { return b != nil && *b }

func readErr(kind, ns, name string, err error) error {
	if apierrors.IsForbidden(err) {
		return fmt.Errorf("mesh: your kubeconfig may not read %s %s/%s, which the target's environment uses: %w", kind, ns, name, err)
	}
	return fmt.Errorf("mesh: reading %s %s/%s for the target's environment: %w", kind, ns, name, err)
}
