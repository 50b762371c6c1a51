package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// waypointPod picks a ready pod of the waypoint (label app.kubernetes.io/name=name) in ns.
func waypointPod(ctx context.Context, kube kubernetes.Interface, ns, name string) (*corev1.Pod, error) {
	pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=" + name})
	if err != nil {
		return nil, fmt.Errorf("finding the waypoint's pods in %s: %w", ns, err)
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue && p.DeletionTimestamp == nil {
				return p, nil
			}
		}
	}
	return nil, fmt.Errorf("no ready pod of waypoint %s in %s (label app.kubernetes.io/name=%s); detour doctor -n %s explains why", name, ns, name, ns)
}

// portForward forwards a local port to the waypoint pod's tunnel port (TCP: the HTTP/2 tunnel)
// through the API server, as kubectl port-forward does, until ctx ends; it returns the local
// address.
func portForward(ctx context.Context, kubeconfig, target string) (string, error) {
	ns, name, _ := strings.Cut(target, "/")
	if ns == "" {
		return "", fmt.Errorf("--port-forward %q: want NAMESPACE or NAMESPACE/WAYPOINT", target)
	}
	if name == "" {
		name = "detour"
	}
	rc, err := userConfig(kubeconfig)
	if err != nil {
		return "", err
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return "", err
	}
	pod, err := waypointPod(ctx, kube, ns, name)
	if err != nil {
		return "", err
	}
	return forwardTo(ctx, rc, pod)
}

func forwardTo(ctx context.Context, rc *rest.Config, pod *corev1.Pod) (string, error) {
	rt, upgrader, err := spdy.RoundTripperFor(rc)
	if err != nil {
		return "", err
	}
	u, err := url.Parse(strings.TrimSuffix(rc.Host, "/") + fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/portforward", pod.Namespace, pod.Name))
	if err != nil {
		return "", err
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	ready := make(chan struct{})
	pf, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:15009"}, ctx.Done(), ready, io.Discard, io.Discard)
	if err != nil {
		return "", err
	}
	errc := make(chan error, 1)
	go func() { errc <- pf.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-errc:
		return "", fmt.Errorf("port-forward to %s/%s: %w", pod.Namespace, pod.Name, err)
	case <-ctx.Done():
		return "", ctx.Err()
	}
	ports, err := pf.GetPorts()
	if err != nil || len(ports) == 0 {
		return "", errors.Join(errors.New("port-forward: no local port"), err)
	}
	return fmt.Sprintf("127.0.0.1:%d", ports[0].Local), nil
}
