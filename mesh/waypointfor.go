package mesh

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// WaypointRef names the waypoint (a Gateway) a service's traffic goes through, and the label
// that chose it.
type WaypointRef struct {
	Namespace, Name string
	From            string // e.g. "service demo/web's istio.io/use-waypoint"
}

// FindWaypoint finds the waypoint of service namespace/svc as istiod resolves it for ambient
// traffic (istio/istio pilot/pkg/serviceregistry/kube/controller/ambient/waypoints.go,
// fetchWaypointForTarget and getUseWaypoint): the service's istio.io/use-waypoint label, else
// its namespace's; "none" on the service stops the search (no waypoint); the waypoint's namespace
// is the labelled object's istio.io/use-waypoint-namespace, else the object's own.
func FindWaypoint(ctx context.Context, kube kubernetes.Interface, namespace, svc string) (WaypointRef, error) {
	s, err := kube.CoreV1().Services(namespace).Get(ctx, svc, metav1.GetOptions{})
	if err != nil {
		return WaypointRef{}, fmt.Errorf("mesh: finding the waypoint of %s/%s: %w", namespace, svc, err)
	}
	if ref, ok, err := waypointLabel(s.Labels, namespace, fmt.Sprintf("service %s/%s", namespace, svc)); ok || err != nil {
		return ref, err
	}
	ns, err := kube.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
	if err != nil {
		return WaypointRef{}, fmt.Errorf("mesh: finding the waypoint of %s/%s: the service has no %s label, and reading its namespace: %w", namespace, svc, UseWaypoint, err)
	}
	if ref, ok, err := waypointLabel(ns.Labels, namespace, "namespace "+namespace); ok || err != nil {
		return ref, err
	}
	return WaypointRef{}, fmt.Errorf("mesh: service %s/%s uses no waypoint (neither it nor its namespace has %s): bind it (detour install --bind, or kubectl label), or give --waypoint or --port-forward", namespace, svc, UseWaypoint)
}

// waypointLabel reads one object's labels: ok when they decide (a waypoint, or "none": an error).
func waypointLabel(labels map[string]string, namespace, what string) (ref WaypointRef, ok bool, err error) {
	name := labels[UseWaypoint]
	switch name {
	case "":
		return WaypointRef{}, false, nil
	case "none":
		return WaypointRef{}, true, fmt.Errorf("mesh: %s has %s=none: its traffic goes through no waypoint, so no session can take it; give --waypoint or --port-forward to use one anyway", what, UseWaypoint)
	}
	ref = WaypointRef{Namespace: namespace, Name: name, From: what + "'s " + UseWaypoint}
	if ns := labels[UseWaypointNamespace]; ns != "" {
		ref.Namespace = ns
		ref.From += " and " + UseWaypointNamespace
	}
	return ref, true, nil
}
