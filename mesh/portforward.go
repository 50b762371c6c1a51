package mesh

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
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// WaypointPod picks a Ready pod of the waypoint name (label app.kubernetes.io/name=name) in ns,
// not being deleted.
func WaypointPod(ctx context.Context, kube kubernetes.Interface, ns, name string) (*corev1.Pod, error) {
	sel := "app.kubernetes.io/name=" + name
	pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		return nil, fmt.Errorf("mesh: finding the waypoint's pods in %s: %w", ns, err)
	}
	if len(pods.Items) == 0 {
		return nil, fmt.Errorf("mesh: no pod of waypoint %s in %s (label %s): install it with detour install -n %s, or name the waypoint as --port-forward NAMESPACE/NAME", name, ns, sel, ns)
	}
	var seen []string
	for i := range pods.Items {
		p := &pods.Items[i]
		if podReady(p) && p.DeletionTimestamp == nil {
			return p, nil
		}
		seen = append(seen, p.Name+" "+podState(p))
	}
	return nil, fmt.Errorf("mesh: no Ready pod of waypoint %s in %s (%s): detour doctor -n %s explains why", name, ns, strings.Join(seen, ", "), ns)
}

// podState is a pod's phase and why it is not Ready, for one line: "Pending
// (ContainerCreating)", "Running, terminating".
func podState(p *corev1.Pod) string {
	s := string(p.Status.Phase)
	if s == "" {
		s = "Pending"
	}
	for _, cs := range p.Status.ContainerStatuses {
		switch {
		case cs.State.Waiting != nil && cs.State.Waiting.Reason != "":
			return s + " (" + cs.State.Waiting.Reason + ")"
		case cs.State.Terminated != nil && cs.State.Terminated.Reason != "":
			return s + " (" + cs.State.Terminated.Reason + ")"
		}
	}
	if p.DeletionTimestamp != nil {
		return s + ", terminating"
	}
	if p.Status.Phase == corev1.PodRunning {
		return s + ", not Ready"
	}
	return s
}

// PortForward is a local loopback port forwarded to a pod's port through the API server, as
// kubectl port-forward does. It runs until the context given to ForwardWaypoint ends.
type PortForward struct {
	addr string
	done chan struct{}
	err  error // set before done is closed
}

// Addr is the local address, 127.0.0.1:PORT.
func (f *PortForward) Addr() string { return f.addr }

// Wait blocks until the forward has stopped (its context ended, or the API server went away)
// and returns why, nil for a cancelled context.
func (f *PortForward) Wait() error {
	<-f.done
	return f.err
}

// ForwardWaypoint forwards a free local port to the tunnel port (TCP 15009: the HTTP/2 tunnel)
// of a ready pod of waypoint name in ns, until ctx ends.
func ForwardWaypoint(ctx context.Context, c *Clients, ns, name string) (*PortForward, error) {
	rc := c.Config
	pod, err := WaypointPod(ctx, c.Kube, ns, name)
	if err != nil {
		return nil, err
	}
	rt, upgrader, err := spdy.RoundTripperFor(rc)
	if err != nil {
		return nil, fmt.Errorf("mesh: port-forward: %w", err)
	}
	u, err := url.Parse(strings.TrimSuffix(rc.Host, "/") + fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/portforward", pod.Namespace, pod.Name))
	if err != nil {
		return nil, fmt.Errorf("mesh: port-forward: %w", err)
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	ready := make(chan struct{})
	pf, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:15009"}, ctx.Done(), ready, io.Discard, io.Discard)
	if err != nil {
		return nil, fmt.Errorf("mesh: port-forward: %w", err)
	}
	f := &PortForward{done: make(chan struct{})}
	go func() {
		defer close(f.done)
		if err := pf.ForwardPorts(); err != nil && ctx.Err() == nil {
			f.err = fmt.Errorf("mesh: port-forward to %s/%s: %w", pod.Namespace, pod.Name, err)
		}
	}()
	select {
	case <-ready:
	case <-f.done:
		return nil, errors.Join(fmt.Errorf("mesh: port-forward to %s/%s did not start", pod.Namespace, pod.Name), f.err, ctx.Err())
	}
	ports, err := pf.GetPorts()
	if err != nil || len(ports) == 0 {
		pf.Close()
		<-f.done
		return nil, errors.Join(errors.New("mesh: port-forward: no local port"), err)
	}
	f.addr = fmt.Sprintf("127.0.0.1:%d", ports[0].Local)
	return f, nil
}
