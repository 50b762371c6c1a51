package route

import "net/netip"

// Workload is what the mesh knows of one pod beyond its address: the names Istio's telemetry
// labels a stream's source and destination with (source_workload, source_canonical_service, ...).
// Shared read-only by the table and every stream.
type Workload struct {
	IPs            []netip.Addr
	Name           string // the workload: the Deployment (ReplicaSet's owner), CronJob, ... or the pod
	Namespace      string
	ServiceAccount string
	// App and Version are the pod's app and version labels ("" when absent).
	App, Version string
	// CanonicalService and CanonicalRevision as Istio derives them from the labels
	// (service.istio.io/canonical-name, app.kubernetes.io/name, app, else the workload name;
	// service.istio.io/canonical-revision, app.kubernetes.io/version, version, else "latest").
	CanonicalService, CanonicalRevision string
	Cluster                             string // "" when unknown
}

// Workload finds the workload at ip: an endpoint's pod, or one of the workloads the table was
// built with. Nil when unknown.
func (t *Table) Workload(ip netip.Addr) *Workload {
	if t == nil {
		return nil
	}
	return t.workloads[ip.Unmap()]
}

// NewWorkload describes a workload from its pod's labels, as Istio does (istio
// pkg/kube/labels/labels.go, CanonicalService): the canonical service is the first of
// service.istio.io/canonical-name, app.kubernetes.io/name and app, else the workload's name; the
// canonical revision the first of service.istio.io/canonical-revision, app.kubernetes.io/version
// and version, else "latest". A service.istio.io/workload-name label names the workload.
func NewWorkload(name, namespace, serviceAccount string, labels map[string]string, ips ...netip.Addr) *Workload {
	if wn, ok := labels["service.istio.io/workload-name"]; ok {
		name = wn
	}
	w := &Workload{IPs: ips, Name: name, Namespace: namespace, ServiceAccount: serviceAccount,
		App: labels["app"], Version: labels["version"], CanonicalService: name, CanonicalRevision: "latest"}
	if v, ok := first(labels, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app"); ok {
		w.CanonicalService = v
	}
	if v, ok := first(labels, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"); ok {
		w.CanonicalRevision = v
	}
	return w
}

func first(labels map[string]string, keys ...string) (string, bool) {
	for _, k := range keys {
		if v, ok := labels[k]; ok {
			return v, true
		}
	}
	return "", false
}
