package mesh

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	authorizationv1 "k8s.io/api/authorization/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Problem is one reason an install cannot go ahead, and its fix.
type Problem struct {
	Check string
	Say   string
	Fix   string
}

// PreflightError is every problem the preflight found. Nothing was written.
type PreflightError struct {
	Namespace string
	Problems  []Problem
}

func (e *PreflightError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "mesh: install into %s refused, nothing was written: %d problem(s)", e.Namespace, len(e.Problems))
	for _, p := range e.Problems {
		fmt.Fprintf(&b, "\n  %-11s %s\n  %-11s %s", p.Check, p.Say, "  fix:", p.Fix)
	}
	return b.String()
}

// GatewayAPIInstall is how to install the Gateway API CRDs (the standard channel, at the version
// Istio builds with).
const GatewayAPIInstall = "kubectl apply --server-side -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.6.0/standard-install.yaml"

// IstioAmbientInstall is how to install Istio in ambient mode.
const IstioAmbientInstall = "istioctl install --set profile=ambient (or Helm: istio/base, istio/istiod --set profile=ambient, istio/cni, istio/ztunnel)"

// preflightLimit bounds the access reviews in flight.
const preflightLimit = 8

// Preflight checks, without writing anything, what Install needs: the API server answers, the
// Gateway API and Istio APIs are served, istiod runs (it published istio-ca-root-cert into the
// namespace) with ambient waypoints enabled (its GatewayClass istio-waypoint exists), the
// namespace exists, the user may do every verb Install and its rollback do (and grant what the
// Roles grant), and the API server accepts every object (server-side dry run). It returns a
// *PreflightError listing every problem.
func (in *Installer) Preflight(ctx context.Context, targets []Target) error {
	if in.Kube == nil {
		return fmt.Errorf("mesh: preflight: Installer.Kube is nil")
	}
	var ps []Problem
	add := func(p Problem) { ps = append(ps, p) }
	if v, err := in.Kube.Discovery().ServerVersion(); err != nil || v == nil {
		add(Problem{"api-server", fmt.Sprintf("the API server does not answer: %v", err),
			"check the kubeconfig and its current context: kubectl cluster-info"})
		return &PreflightError{in.Namespace, ps}
	}
	in.checkAPIs(add)
	in.checkNamespace(ctx, add)
	if len(ps) > 0 {
		// Without the APIs or the namespace, access reviews and dry runs only repeat it.
		return &PreflightError{in.Namespace, ps}
	}
	in.checkIstiod(ctx, add)
	if err := in.checkAccess(ctx, targets, add); err != nil {
		return err
	}
	if len(ps) == 0 {
		in.checkDryRun(ctx, add)
	}
	if len(ps) > 0 {
		return &PreflightError{in.Namespace, ps}
	}
	return nil
}

// served reports whether the API server serves resource in groupVersion.
func (in *Installer) served(groupVersion, resource string) (bool, error) {
	list, err := in.Kube.Discovery().ServerResourcesForGroupVersion(groupVersion)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == resource }), nil
}

func (in *Installer) checkAPIs(add func(Problem)) {
	for _, api := range []struct{ check, gv, resource, fix string }{
		{"gateway-api", "gateway.networking.k8s.io/v1", "gateways", GatewayAPIInstall},
		{"istio-crds", "security.istio.io/v1", "authorizationpolicies", IstioAmbientInstall},
		{"pod-monitor", "monitoring.coreos.com/v1", "podmonitors", "install the Prometheus Operator's CRDs, or install without --pod-monitor (the pods keep their prometheus.io scrape annotations)"},
	} {
		if api.check == "pod-monitor" && !in.Pod.PodMonitor {
			continue
		}
		ok, err := in.served(api.gv, api.resource)
		switch {
		case err != nil:
			add(Problem{api.check, fmt.Sprintf("cannot read whether %s %s is served: %v", api.gv, api.resource, err), "check the API server's health: kubectl get --raw /readyz"})
		case !ok:
			add(Problem{api.check, fmt.Sprintf("the cluster does not serve %s %s (its CRDs are not installed)", api.gv, api.resource), api.fix})
		}
	}
}

func (in *Installer) checkNamespace(ctx context.Context, add func(Problem)) {
	_, err := in.Kube.CoreV1().Namespaces().Get(ctx, in.Namespace, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		add(Problem{"namespace", "namespace " + in.Namespace + " does not exist",
			"kubectl create namespace " + in.Namespace + " && kubectl label namespace " + in.Namespace + " istio.io/dataplane-mode=ambient"})
	case apierrors.IsForbidden(err):
		// May not read namespaces: the access reviews below say what is missing, if anything.
	case err != nil:
		add(Problem{"namespace", "reading namespace " + in.Namespace + ": " + err.Error(), "check the API server's health: kubectl get --raw /readyz"})
	}
}

// checkIstiod: istiod's namespace controller publishes istio-ca-root-cert into every namespace
// it watches (the waypoint mounts it), and istiod creates the GatewayClass istio-waypoint only
// with ambient enabled (istio pilot/pkg/config/kube/gatewaycommon/classinfo.go,
// GetBuiltinGatewayClasses). A user who may not read GatewayClasses is not refused for it.
// istiod writes the ConfigMap a moment after a namespace is created: a missing one is looked for
// again, every 200ms for up to rootCertWait.
func (in *Installer) checkIstiod(ctx context.Context, add func(Problem)) {
	err := in.rootCert(ctx)
	switch {
	case apierrors.IsNotFound(err):
		add(Problem{"istiod", "no ConfigMap istio-ca-root-cert in " + in.Namespace + ": istiod is not running, or does not watch this namespace",
			"kubectl -n istio-system get deploy istiod (" + IstioAmbientInstall + "); with discoverySelectors, select " + in.Namespace})
	case err != nil && !apierrors.IsForbidden(err):
		add(Problem{"istiod", "reading ConfigMap " + in.Namespace + "/istio-ca-root-cert: " + err.Error(), "check the API server's health: kubectl get --raw /readyz"})
	}
	_, err = in.Client.Resource(gvrGatewayClass).Get(ctx, "istio-waypoint", metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		add(Problem{"ambient", "no GatewayClass istio-waypoint: istiod runs without ambient mode (PILOT_ENABLE_AMBIENT)", IstioAmbientInstall})
	}
}

// rootCertWait is how long the preflight waits for istio-ca-root-cert (Installer.rootCertWait 0).
const rootCertWait = 10 * time.Second

func (in *Installer) rootCert(ctx context.Context) error {
	wait := in.rootCertWait
	if wait == 0 {
		wait = rootCertWait
	}
	deadline := time.Now().Add(wait)
	for {
		_, err := in.Kube.CoreV1().ConfigMaps(in.Namespace).Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if !apierrors.IsNotFound(err) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

var gvrGatewayClass = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gatewayclasses"}

// access is one SelfSubjectAccessReview: a verb on a resource (in namespace ns, or cluster-wide
// for a cluster-scoped one; name optional).
type access struct {
	verb, group, resource, name string
	ns                          string // "" when cluster
	cluster                     bool
}

// accesses are what Install, its rollback and Uninstall do, and what the Roles grant (RBAC lets
// a user create a Role, or bind one, only with every permission it holds, or escalate/bind).
func (in *Installer) accesses(targets []Target) []access {
	var out []access
	for _, o := range in.Objects() {
		ns, namespaced := objectNamespace(o)
		for _, verb := range []string{"get", "create", "patch", "delete"} {
			out = append(out, access{verb: verb, group: o.Resource.Group, resource: o.Resource.Resource, ns: ns, cluster: !namespaced})
		}
		rules, _ := o.Body["rules"].([]any)
		for _, r := range rules {
			r := r.(map[string]any)
			names, _ := r["resourceNames"].([]any)
			if len(names) == 0 {
				names = []any{""}
			}
			for _, g := range r["apiGroups"].([]any) {
				for _, res := range r["resources"].([]any) {
					for _, v := range r["verbs"].([]any) {
						for _, n := range names {
							out = append(out, access{verb: v.(string), group: g.(string), resource: res.(string), name: n.(string), ns: ns, cluster: !namespaced})
						}
					}
				}
			}
		}
	}
	for _, t := range targets {
		if t.Service == "" {
			out = append(out, access{verb: "patch", resource: "namespaces", name: in.Namespace, cluster: true})
		} else {
			out = append(out, access{verb: "patch", resource: "services", name: t.Service, ns: in.Namespace})
		}
	}
	slices.SortFunc(out, func(a, b access) int {
		return strings.Compare(a.ns+" "+a.key()+" "+a.verb, b.ns+" "+b.key()+" "+b.verb)
	})
	return slices.Compact(out)
}

func (a access) key() string {
	r := a.resource
	if a.group != "" {
		r += "." + a.group
	}
	if a.name != "" {
		r += "/" + a.name
	}
	return r
}

// checkAccess asks the API server, preflightLimit at a time, whether the user may do each
// access, and adds one problem per resource with its missing verbs.
func (in *Installer) checkAccess(ctx context.Context, targets []Target, add func(Problem)) error {
	var mu sync.Mutex
	denied := map[access][]string{} // resource (verb ""), by namespace -> verbs
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(preflightLimit)
	for _, a := range in.accesses(targets) {
		g.Go(func() error {
			attr := &authorizationv1.ResourceAttributes{Verb: a.verb, Group: a.group, Resource: a.resource, Name: a.name, Namespace: a.ns}
			r, err := in.Kube.AuthorizationV1().SelfSubjectAccessReviews().Create(gctx,
				&authorizationv1.SelfSubjectAccessReview{Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: attr}}, metav1.CreateOptions{})
			if err != nil {
				return fmt.Errorf("mesh: preflight: reviewing access to %s %s: %w", a.verb, a.key(), err)
			}
			if !r.Status.Allowed {
				mu.Lock()
				r := a
				r.verb = ""
				denied[r] = append(denied[r], a.verb)
				mu.Unlock()
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	keys := make([]access, 0, len(denied))
	for k := range denied {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b access) int { return strings.Compare(a.key()+" "+a.ns, b.key()+" "+b.ns) })
	for _, k := range keys {
		verbs := denied[k]
		slices.Sort(verbs)
		where, role, check := "in namespace "+k.ns, "a Role in "+k.ns, " -n "+k.ns
		if k.cluster {
			where, role, check = "cluster-wide", "a ClusterRole", ""
		}
		add(Problem{"access", fmt.Sprintf("you may not %s %s %s", strings.Join(verbs, ","), k.key(), where),
			fmt.Sprintf("ask a cluster admin for %s granting %s on %s (check: kubectl auth can-i %s %s%s)",
				role, strings.Join(verbs, ","), k.key(), verbs[0], k.key(), check)})
	}
	return nil
}

// checkDryRun applies every object with server-side dry run: validation, admission webhooks and
// quota answer before anything is written.
func (in *Installer) checkDryRun(ctx context.Context, add func(Problem)) {
	for _, o := range in.Objects() {
		switch o.Resource.Resource {
		case "customresourcedefinitions", "rolebindings", "clusterrolebindings":
			// A CRD's dry run says nothing about the objects that need it; a binding's is refused
			// while its Role does not exist yet (RBAC resolves the role's rules). Both are
			// covered by the access reviews.
			continue
		}
		if err := in.apply(ctx, o, true); err != nil {
			add(Problem{"dry-run", err.Error(), "fix what the API server refused (detour install --print shows the object)"})
		}
	}
}
