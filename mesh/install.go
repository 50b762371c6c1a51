package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/detour-mesh/detour/proxy/route"
)

// Labels and annotations detour reads and writes on the objects it binds.
const (
	UseWaypoint          = "istio.io/use-waypoint"
	UseWaypointNamespace = "istio.io/use-waypoint-namespace"
	// PreviousAnnotation keeps, on a bound Namespace or Service, what its two waypoint labels
	// were before detour bound it (JSON: label -> value, a missing label absent), so uninstall
	// restores exactly that.
	PreviousAnnotation = "detour.dev/previous-waypoint-labels"
	FieldManager       = "detour"
	ManagedBy          = "app.kubernetes.io/managed-by"
	// Image is what `ko` builds (`ko resolve` replaces the reference with the built image): the
	// image of Installer.Image "" (a development build has no published image; ReleaseImage).
	Image = "ko://github.com/detour-mesh/detour/cmd/detour"
	// Version labels the Deployment with the detour version that installed it (doctor compares).
	VersionLabel = "app.kubernetes.io/version"
)

// Target is what a waypoint binding applies to: a whole namespace, or one Service.
type Target struct {
	Service string // "" binds the namespace
}

func (t Target) String() string {
	if t.Service == "" {
		return "namespace"
	}
	return "svc/" + t.Service
}

// ParseTarget reads "namespace" or "svc/NAME".
func ParseTarget(s string) (Target, error) {
	if s == "namespace" {
		return Target{}, nil
	}
	if name, ok := strings.CutPrefix(s, "svc/"); ok && name != "" {
		return Target{Service: name}, nil
	}
	return Target{}, fmt.Errorf("mesh: bind target %q: want namespace or svc/NAME", s)
}

// Installer puts a detour waypoint into a namespace and binds targets to it, and takes both
// back. Objects detour owns are applied server-side with field manager "detour"; bindings are
// label patches whose previous state is kept in PreviousAnnotation.
type Installer struct {
	Client    dynamic.Interface
	Namespace string
	Name      string // default "detour"
	Image     string // default Image
	// TakeOver lets a bind replace another waypoint's binding (restored on uninstall).
	TakeOver bool
	// Force binds targets that Istio config detour does not implement would apply to
	// (FindUnsupported: VirtualServices, DestinationRules, EnvoyFilters, WasmPlugins,
	// TrafficExtensions, Telemetry beyond the defaults, routes detour refuses); without it
	// Install refuses them, naming each object.
	Force bool
	// DryRun validates everything on the API server and changes nothing.
	DryRun bool

	// Kube answers the preflight (discovery, access reviews) and the wait; Install needs it.
	Kube kubernetes.Interface
	// Version is the installing CLI's version, the Deployment's VersionLabel ("" leaves it out).
	Version  string
	Replicas int        // default 2
	Pod      PodOptions // resources, scrape annotations, PodMonitor (pod.go)
	// KeepPartial keeps what a failed Install wrote; by default it is removed again.
	KeepPartial bool
	// Wait makes Install wait for the Deployment to be Available and the Gateway Programmed
	// (bounded by ctx), and a failed wait fails the install.
	Wait bool
	// Progress, if set, receives one line per step (the wait's progress among them).
	Progress func(string)
	// RootNamespace is istiod's root namespace, where its mesh config ConfigMap (MeshConfigMap:
	// the extensionProviders CUSTOM policies name) lives and the waypoint is let read it; default
	// istio-system. The waypoint's config carries it (waypoint.rootNamespace).
	RootNamespace string

	rootCertWait time.Duration // 0 is rootCertWait (preflight.go); tests shorten it
}

var (
	gvrNamespace = schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}
	gvrService   = schema.GroupVersionResource{Version: "v1", Resource: "services"}
)

// Object is one object detour creates.
type Object struct {
	Resource schema.GroupVersionResource
	Body     map[string]any
}

func (in *Installer) name() string {
	if in.Name == "" {
		return "detour"
	}
	return in.Name
}

func (in *Installer) rootNamespace() string {
	if in.RootNamespace == "" {
		return "istio-system"
	}
	return in.RootNamespace
}

// Hostname is the waypoint Service's DNS name, the Gateway's address.
func (in *Installer) Hostname() string {
	return in.name() + "." + in.Namespace + ".svc.cluster.local"
}

// TerminationGracePeriodSeconds is the waypoint pods' grace period: the default drain
// (config.DefaultDrainPeriod + config.DefaultDrainTimeout) and 5s before the kubelet's SIGKILL, as
// ztunnel keeps its own deadline 5s under the pod's (src/config.rs self_termination_deadline).
const TerminationGracePeriodSeconds = 30

// Objects are what Install applies, in order.
func (in *Installer) Objects() []Object {
	name, ns := in.name(), in.Namespace
	image := in.Image
	if image == "" {
		image = Image
	}
	meta := func(extra map[string]any) map[string]any {
		m := map[string]any{"name": name, "namespace": ns, "labels": map[string]any{ManagedBy: "detour", "app.kubernetes.io/name": name}}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	clusterMeta := map[string]any{"name": in.clusterName(), "labels": map[string]any{ManagedBy: "detour", "app.kubernetes.io/name": name}}
	podLabels := map[string]any{"app.kubernetes.io/name": name, "istio.io/dataplane-mode": "none"}
	config := fmt.Sprintf(`identity:
  source: istio-ca
  istioCA: {tokenFile: /var/run/secrets/tokens/istio-token, rootCertFile: /var/run/secrets/istio/root-cert.pem}
listeners: {hbone: "0.0.0.0:15008", tunnel: "0.0.0.0:15009", health: "0.0.0.0:15021"}
waypoint: {namespace: %s, gateway: %s, rootNamespace: %s}
discovery:
  source: kubernetes
  kubernetes: {namespace: %s}
`, ns, name, in.rootNamespace(), ns)
	// The mesh config's Role and RoleBinding live in the root namespace, named per installation
	// as the cluster-scoped objects are (several detour installations share that namespace).
	rootMeta := map[string]any{"name": in.clusterName(), "namespace": in.rootNamespace(),
		"labels": map[string]any{ManagedBy: "detour", "app.kubernetes.io/name": name}}
	return append([]Object{
		{gvrCRD, debugSessionCRD()},
		{schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}, map[string]any{
			"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(nil)}},
		{gvrRole, map[string]any{
			"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(nil),
			"rules": []any{
				map[string]any{"apiGroups": []any{""}, "resources": []any{"pods"}, "verbs": []any{"get", "list", "watch"}},
				// patch: a session may bind an unbound service for its life (per-session binding).
				map[string]any{"apiGroups": []any{""}, "resources": []any{"services"}, "verbs": []any{"get", "list", "watch", "patch"}},
				map[string]any{"apiGroups": []any{"coordination.k8s.io"}, "resources": []any{"leases"}, "verbs": []any{"get", "list", "watch", "create", "patch", "delete"}},
				// replicas share their sessions
				map[string]any{"apiGroups": []any{"detour.dev"}, "resources": []any{"debugsessions"}, "verbs": []any{"get", "list", "watch", "create", "patch", "delete"}},
				map[string]any{"apiGroups": []any{"discovery.k8s.io"}, "resources": []any{"endpointslices"}, "verbs": []any{"get", "list", "watch"}},
				map[string]any{"apiGroups": []any{"security.istio.io"}, "resources": []any{"authorizationpolicies", "requestauthentications"}, "verbs": []any{"get", "list", "watch"}},
				// the routes a waypoint applies (Discovery waits for their informers to sync: without
				// these a cluster serving the Gateway API would never make the waypoint ready)
				map[string]any{"apiGroups": []any{"gateway.networking.k8s.io"}, "resources": []any{"httproutes", "grpcroutes", "tcproutes", "tlsroutes"}, "verbs": []any{"get", "list", "watch"}},
				// its own Gateway: whether it admits services of other namespaces, which this
				// one-namespace waypoint cannot see (reported as unsupported, scope.go)
				map[string]any{"apiGroups": []any{"gateway.networking.k8s.io"}, "resources": []any{"gateways"}, "verbs": []any{"get", "list", "watch"}},
				// the Istio objects detour does not implement, reported when they would apply (a
				// waypoint that may not read them leaves them out, logged)
				map[string]any{"apiGroups": []any{"networking.istio.io"}, "resources": []any{"virtualservices", "destinationrules", "envoyfilters"}, "verbs": []any{"get", "list", "watch"}},
				map[string]any{"apiGroups": []any{"extensions.istio.io"}, "resources": []any{"wasmplugins", "trafficextensions"}, "verbs": []any{"get", "list", "watch"}},
				map[string]any{"apiGroups": []any{"telemetry.istio.io"}, "resources": []any{"telemetries"}, "verbs": []any{"get", "list", "watch"}},
			}}},
		{gvrRoleBinding, map[string]any{
			"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(nil),
			"roleRef":  map[string]any{"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
			"subjects": []any{map[string]any{"kind": "ServiceAccount", "name": name, "namespace": ns}}}},
		// Discovery reads the namespace's istio.io/use-waypoint labels (a waypoint serves only what
		// is bound to it): namespaces are cluster-scoped, so this one role is a ClusterRole, named
		// per installation and holding nothing else.
		{gvrClusterRole, map[string]any{
			"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": clusterMeta,
			"rules": []any{
				map[string]any{"apiGroups": []any{""}, "resources": []any{"namespaces"}, "verbs": []any{"get", "list", "watch"}},
			}}},
		{gvrClusterRoleBinding, map[string]any{
			"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": clusterMeta,
			"roleRef":  map[string]any{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": in.clusterName()},
			"subjects": []any{map[string]any{"kind": "ServiceAccount", "name": name, "namespace": ns}}}},
		// Discovery reads istiod's mesh config (extensionProviders, for CUSTOM policies) from the
		// root namespace: that one ConfigMap, nothing else there (get, and list/watch with its
		// metadata.name field selector, which RBAC's resourceNames admit).
		{gvrRole, map[string]any{
			"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": rootMeta,
			"rules": []any{
				map[string]any{"apiGroups": []any{""}, "resources": []any{"configmaps"}, "resourceNames": []any{MeshConfigMap}, "verbs": []any{"get", "list", "watch"}},
				// the mesh-wide Istio objects detour does not implement, reported when they apply
				map[string]any{"apiGroups": []any{"networking.istio.io"}, "resources": []any{"destinationrules", "envoyfilters"}, "verbs": []any{"get", "list", "watch"}},
				map[string]any{"apiGroups": []any{"extensions.istio.io"}, "resources": []any{"wasmplugins", "trafficextensions"}, "verbs": []any{"get", "list", "watch"}},
				map[string]any{"apiGroups": []any{"telemetry.istio.io"}, "resources": []any{"telemetries"}, "verbs": []any{"get", "list", "watch"}},
			}}},
		{gvrRoleBinding, map[string]any{
			"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": rootMeta,
			"roleRef":  map[string]any{"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": in.clusterName()},
			"subjects": []any{map[string]any{"kind": "ServiceAccount", "name": name, "namespace": ns}}}},
		{schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, map[string]any{
			"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(nil), "data": map[string]any{"config.yaml": config}}},
		{gvrDeployment, map[string]any{
			"apiVersion": "apps/v1", "kind": "Deployment", "metadata": in.versioned(meta(nil)),
			"spec": map[string]any{
				"replicas": in.replicas(),
				"selector": map[string]any{"matchLabels": map[string]any{"app.kubernetes.io/name": name}},
				"template": map[string]any{
					"metadata": map[string]any{"labels": podLabels, "annotations": in.Pod.annotations()},
					"spec": map[string]any{
						"serviceAccountName": name,
						// SIGTERM starts the waypoint's drain (proxy/drain): its period and timeout
						// (waypoint.drain, 5s + 20s by default) fit, with 5s to spare before SIGKILL.
						"terminationGracePeriodSeconds": TerminationGracePeriodSeconds,
						"containers": []any{map[string]any{
							"name": "detour", "image": image,
							"args": []any{"waypoint", "--config", "/etc/detour/config.yaml"},
							// Other replicas relay to this address (sessions held here).
							"env": []any{map[string]any{"name": "POD_IP", "valueFrom": map[string]any{"fieldRef": map[string]any{"fieldPath": "status.podIP"}}}},
							"ports": []any{
								map[string]any{"name": "mesh", "containerPort": 15008, "protocol": "TCP"},
								map[string]any{"name": "tunnel", "containerPort": 15009, "protocol": "TCP"},
								map[string]any{"name": "tunnel-quic", "containerPort": 15009, "protocol": "UDP"},
								map[string]any{"name": "health", "containerPort": 15021, "protocol": "TCP"},
							},
							"readinessProbe": map[string]any{"httpGet": map[string]any{"path": "/readyz", "port": 15021}},
							"resources":      in.Pod.resources(),
							"volumeMounts": []any{
								map[string]any{"name": "config", "mountPath": "/etc/detour"},
								map[string]any{"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
								map[string]any{"name": "istio-ca-root", "mountPath": "/var/run/secrets/istio"},
							},
							"securityContext": map[string]any{"runAsNonRoot": true, "runAsUser": 1337, "allowPrivilegeEscalation": false,
								"capabilities": map[string]any{"drop": []any{"ALL"}}},
						}},
						"volumes": []any{
							map[string]any{"name": "config", "configMap": map[string]any{"name": name}},
							map[string]any{"name": "istio-token", "projected": map[string]any{"sources": []any{map[string]any{
								"serviceAccountToken": map[string]any{"path": "istio-token", "audience": "istio-ca", "expirationSeconds": 43200}}}}},
							map[string]any{"name": "istio-ca-root", "configMap": map[string]any{"name": "istio-ca-root-cert"}},
						},
					},
				},
			}}},
		{gvrService, map[string]any{
			"apiVersion": "v1", "kind": "Service", "metadata": meta(nil),
			"spec": map[string]any{
				"selector": map[string]any{"app.kubernetes.io/name": name},
				"ports": []any{
					map[string]any{"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"},
					map[string]any{"name": "tunnel", "port": 15009, "targetPort": 15009, "protocol": "TCP"},
					map[string]any{"name": "tunnel-quic", "port": 15009, "targetPort": 15009, "protocol": "UDP"},
				},
			}}},
		{schema.GroupVersionResource{Group: "policy", Version: "v1", Resource: "poddisruptionbudgets"}, map[string]any{
			"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(nil),
			"spec": map[string]any{"minAvailable": 1, "selector": map[string]any{"matchLabels": map[string]any{"app.kubernetes.io/name": name}}}}},
		{schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}, map[string]any{
			"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
			"metadata": func() map[string]any {
				m := meta(nil)
				m["labels"].(map[string]any)["istio.io/waypoint-for"] = "service"
				return m
			}(),
			"spec": map[string]any{
				"gatewayClassName": "istio-waypoint",
				"addresses":        []any{map[string]any{"type": "Hostname", "value": in.Hostname()}},
				"listeners":        []any{map[string]any{"name": "mesh", "port": 15008, "protocol": "HBONE"}},
			}}},
	}, in.Pod.podMonitor(meta(nil), name)...)
}

// Manifests renders Objects as one multi-document YAML (the kustomize base is this output).
func (in *Installer) Manifests() ([]byte, error) {
	var out []byte
	for i, o := range in.Objects() {
		b, err := yaml.Marshal(o.Body)
		if err != nil {
			return nil, err
		}
		if i > 0 {
			out = append(out, "---\n"...)
		}
		out = append(out, b...)
	}
	return out, nil
}

func (in *Installer) dry() []string {
	if in.DryRun {
		return []string{metav1.DryRunAll}
	}
	return nil
}

// Install checks first (Preflight: nothing is written when it fails), applies the objects, binds
// targets, and with Wait waits for the waypoint to serve. A target bound to another waypoint is
// refused (nothing is changed) unless TakeOver. When anything fails after the first write, what
// this install created is deleted again and the bindings it made are undone (rollout.go), unless
// KeepPartial.
func (in *Installer) Install(ctx context.Context, targets []Target) error {
	if err := in.Preflight(ctx, targets); err != nil {
		return err
	}
	for _, t := range targets {
		if err := in.checkBind(ctx, t); err != nil {
			return err
		}
	}
	if err := in.checkUnsupported(ctx, targets); err != nil {
		return err
	}
	var w written
	err := in.write(ctx, targets, &w)
	if err == nil && in.Wait && !in.DryRun {
		err = in.WaitReady(ctx)
	}
	if err == nil || in.DryRun {
		return err
	}
	return in.undo(ctx, &w, err)
}

// apply applies one object server-side (dry, or as Installer.DryRun says).
func (in *Installer) apply(ctx context.Context, o Object, dry bool) error {
	b, err := json.Marshal(o.Body)
	if err != nil {
		return err
	}
	name := o.Body["metadata"].(map[string]any)["name"].(string)
	force := true
	opts := metav1.PatchOptions{FieldManager: FieldManager, Force: &force, DryRun: in.dry()}
	if dry {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	if _, err = in.resource(o).Patch(ctx, name, types.ApplyPatchType, b, opts); err != nil {
		return fmt.Errorf("mesh: applying %s %s: %w", o.Body["kind"], objectName(o), err)
	}
	return nil
}

func (in *Installer) target(t Target) (schema.GroupVersionResource, string, string) {
	if t.Service == "" {
		return gvrNamespace, "", in.Namespace
	}
	return gvrService, in.Namespace, t.Service
}

func (in *Installer) get(ctx context.Context, t Target) (*unstructured.Unstructured, error) {
	gvr, ns, name := in.target(t)
	obj, err := in.Client.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("mesh: binding %s: %w", t, err)
	}
	return obj, nil
}

// checkBind refuses a target already bound to another waypoint (unless TakeOver).
func (in *Installer) checkBind(ctx context.Context, t Target) error {
	obj, err := in.get(ctx, t)
	if err != nil {
		return err
	}
	labels := obj.GetLabels()
	if _, ours := obj.GetAnnotations()[PreviousAnnotation]; ours {
		return nil // bound by us already: idempotent
	}
	cur, other := labels[UseWaypoint], labels[UseWaypointNamespace]
	if (cur == "" || cur == in.name() && (other == "" || other == in.Namespace)) || in.TakeOver {
		return nil
	}
	where := cur
	if other != "" {
		where = other + "/" + cur
	}
	return fmt.Errorf("mesh: %s %s is bound to waypoint %s; pass --take-over to replace it (uninstall restores it)", t, in.Namespace, where)
}

// checkUnsupported refuses targets (unless Force) that Istio config detour does not implement
// would apply to once bound: Istio's waypoint would honour it, detour would not, for every caller.
func (in *Installer) checkUnsupported(ctx context.Context, targets []Target) error {
	if in.Force || len(targets) == 0 {
		return nil
	}
	seen := map[string]bool{}
	var svcs []*route.Service
	add := func(name string) {
		if !seen[name] && name != in.name() {
			seen[name] = true
			svcs = append(svcs, &route.Service{Namespace: in.Namespace, Name: name, Hostname: name + "." + in.Namespace + ".svc.cluster.local"})
		}
	}
	for _, t := range targets {
		if t.Service != "" {
			add(t.Service)
			continue
		}
		list, err := in.Client.Resource(gvrService).Namespace(in.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return fmt.Errorf("mesh: listing the services of %s: %w", in.Namespace, err)
		}
		for _, item := range list.Items {
			add(item.GetName())
		}
	}
	found, err := FindUnsupported(ctx, in.Client, in.Namespace, in.name(), in.rootNamespace(), svcs)
	if err != nil {
		return fmt.Errorf("%w (pass --force to bind without this check)", err)
	}
	if len(found) > 0 {
		names := make([]string, 0, len(targets))
		for _, t := range targets {
			names = append(names, t.String())
		}
		return RefuseUnsupported(strings.Join(names, ", "), found, "--force")
	}
	return nil
}

// bind sets the waypoint labels, keeping what they were in PreviousAnnotation.
func (in *Installer) bind(ctx context.Context, t Target) error {
	obj, err := in.get(ctx, t)
	if err != nil {
		return err
	}
	patch := map[string]any{}
	labels := map[string]any{UseWaypoint: in.name(), UseWaypointNamespace: nil}
	if _, done := obj.GetAnnotations()[PreviousAnnotation]; !done {
		prev := map[string]string{}
		for _, k := range []string{UseWaypoint, UseWaypointNamespace} {
			if v, ok := obj.GetLabels()[k]; ok {
				prev[k] = v
			}
		}
		b, _ := json.Marshal(prev)
		patch["metadata"] = map[string]any{"labels": labels, "annotations": map[string]any{PreviousAnnotation: string(b)}}
	} else {
		patch["metadata"] = map[string]any{"labels": labels}
	}
	return in.patch(ctx, t, patch)
}

func (in *Installer) patch(ctx context.Context, t Target, patch map[string]any) error {
	gvr, ns, name := in.target(t)
	b, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	if _, err := in.Client.Resource(gvr).Namespace(ns).Patch(ctx, name, types.MergePatchType, b,
		metav1.PatchOptions{FieldManager: FieldManager, DryRun: in.dry()}); err != nil {
		return fmt.Errorf("mesh: binding %s: %w", t, err)
	}
	return nil
}

// Uninstall restores every binding detour made in the namespace (the namespace itself and its
// Services carrying PreviousAnnotation) and deletes the objects it applied.
func (in *Installer) Uninstall(ctx context.Context) error {
	var errs []error
	targets := []Target{{}}
	svcs, err := in.Client.Resource(gvrService).Namespace(in.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("mesh: listing services: %w", err)
	}
	for _, s := range svcs.Items {
		if _, ok := s.GetAnnotations()[PreviousAnnotation]; ok {
			targets = append(targets, Target{Service: s.GetName()})
		}
	}
	for _, t := range targets {
		if err := in.unbind(ctx, t); err != nil {
			errs = append(errs, err)
		}
	}
	all := *in
	all.Pod.PodMonitor = true // installed with or without one: delete it if there (404 without its CRD)
	objs := all.Objects()
	slices.Reverse(objs)
	for _, o := range objs {
		name := o.Body["metadata"].(map[string]any)["name"].(string)
		if o.Resource == gvrCRD {
			// Shared by every namespace's detour: removed with the last one.
			if others, err := in.othersInstalled(ctx); err != nil || others {
				continue
			}
		}
		err := in.resource(o).Delete(ctx, name, metav1.DeleteOptions{DryRun: in.dry()})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("mesh: deleting %s %s: %w", o.Body["kind"], objectName(o), err))
		}
	}
	return errors.Join(errs...)
}

// unbind puts back the labels PreviousAnnotation recorded and removes the annotation.
func (in *Installer) unbind(ctx context.Context, t Target) error {
	obj, err := in.get(ctx, t)
	if err != nil {
		return err
	}
	raw, ok := obj.GetAnnotations()[PreviousAnnotation]
	if !ok {
		return nil
	}
	prev := map[string]string{}
	if err := json.Unmarshal([]byte(raw), &prev); err != nil {
		return fmt.Errorf("mesh: %s: annotation %s: %w", t, PreviousAnnotation, err)
	}
	labels := map[string]any{UseWaypoint: nil, UseWaypointNamespace: nil}
	for k, v := range prev {
		labels[k] = v
	}
	return in.patch(ctx, t, map[string]any{"metadata": map[string]any{"labels": labels, "annotations": map[string]any{PreviousAnnotation: nil}}})
}

var (
	gvrDeployment         = schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}
	gvrCRD                = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	gvrRole               = schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "roles"}
	gvrRoleBinding        = schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "rolebindings"}
	gvrClusterRole        = schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"}
	gvrClusterRoleBinding = schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"}
)

// clusterName names this installation's cluster-scoped objects: one per namespace and name.
func (in *Installer) clusterName() string { return "detour:" + in.Namespace + ":" + in.name() }

// resource is o's client: cluster-scoped objects have no namespace in their metadata; the others
// are in theirs (the installation's namespace, or the root namespace for the mesh config's Role).
func (in *Installer) resource(o Object) dynamic.ResourceInterface {
	ns, ok := objectNamespace(o)
	if !ok {
		return in.Client.Resource(o.Resource)
	}
	return in.Client.Resource(o.Resource).Namespace(ns)
}

// objectNamespace is o's namespace; false for a cluster-scoped object.
func objectNamespace(o Object) (string, bool) {
	ns, ok := o.Body["metadata"].(map[string]any)["namespace"].(string)
	return ns, ok
}

// objectName is o's namespace/name (name alone for a cluster-scoped object), for errors.
func objectName(o Object) string {
	name := o.Body["metadata"].(map[string]any)["name"].(string)
	if ns, ok := objectNamespace(o); ok {
		return ns + "/" + name
	}
	return name
}

// othersInstalled reports whether detour runs in another namespace (its Gateway there).
func (in *Installer) othersInstalled(ctx context.Context) (bool, error) {
	list, err := in.Client.Resource(schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}).
		List(ctx, metav1.ListOptions{LabelSelector: ManagedBy + "=detour"})
	if err != nil {
		return false, err
	}
	for _, g := range list.Items {
		if g.GetNamespace() != in.Namespace {
			return true, nil
		}
	}
	return false, nil
}

// debugSessionCRD defines DebugSession: a session one replica holds, for the others to relay to.
func debugSessionCRD() map[string]any {
	open := map[string]any{"type": "object", "x-kubernetes-preserve-unknown-fields": true}
	return map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
		"metadata": map[string]any{"name": "debugsessions.detour.dev", "labels": map[string]any{ManagedBy: "detour"}},
		"spec": map[string]any{
			"group": "detour.dev",
			"names": map[string]any{"kind": "DebugSession", "listKind": "DebugSessionList", "plural": "debugsessions", "singular": "debugsession"},
			"scope": "Namespaced",
			"versions": []any{map[string]any{
				"name": "v1alpha1", "served": true, "storage": true,
				"schema": map[string]any{"openAPIV3Schema": map[string]any{"type": "object", "properties": map[string]any{
					"spec": open, "status": open}}},
				"additionalPrinterColumns": []any{
					map[string]any{"name": "Service", "type": "string", "jsonPath": ".spec.host"},
					map[string]any{"name": "Mode", "type": "string", "jsonPath": ".spec.session.mode"},
					map[string]any{"name": "Holder", "type": "string", "jsonPath": ".spec.holder"},
					map[string]any{"name": "Replica", "type": "string", "jsonPath": ".spec.replica"},
				},
			}},
		},
	}
}
