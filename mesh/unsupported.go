package mesh

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	typev1beta1 "istio.io/api/type/v1beta1"
	extensionsv1alpha1 "istio.io/client-go/pkg/apis/extensions/v1alpha1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	networkingv1alpha3 "istio.io/client-go/pkg/apis/networking/v1alpha3"
	telemetryv1 "istio.io/client-go/pkg/apis/telemetry/v1"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/detour-mesh/detour/proxy/route"
)

// Unsupported is an Istio object that would apply to services bound to this waypoint (were it
// Istio's) and that detour does not implement: reported, one warning when it appears or
// changes and the waypoint's detour_unsupported_config gauge, never applied.
type Unsupported struct {
	Kind, Namespace, Name string
	// Services are the bound services (namespace/name) it would apply to.
	Services []string
	// Differs says what is not applied.
	Differs string
}

// What each kind does that detour leaves out.
var differs = map[string]string{
	"VirtualService":   "its routes (weights, matches, rewrites, retries, timeouts, fault injection, mirrors) are not applied; traffic goes to the addressed service or as its Gateway API routes say",
	"DestinationRule":  "its traffic policy (load balancing, connection pool, outlier detection, TLS) and subsets are not applied",
	"EnvoyFilter":      "its Envoy configuration patches are not applied (detour is not Envoy)",
	"WasmPlugin":       "its Wasm plugin does not run",
	"TrafficExtension": "its extension (Wasm or Lua) does not run",
}

// unsupportedListers list the watched objects of the kinds detour reports; a nil lister is a
// kind not watched (not served, or not readable).
type unsupportedListers struct {
	virtualServices  func() ([]*networkingv1.VirtualService, error)
	destinationRules func() ([]*networkingv1.DestinationRule, error)
	envoyFilters     func() ([]*networkingv1alpha3.EnvoyFilter, error)
	wasmPlugins      func() ([]*extensionsv1alpha1.WasmPlugin, error)
	extensions       func() ([]*extensionsv1alpha1.TrafficExtension, error)
	telemetries      func() ([]*telemetryv1.Telemetry, error)
	routes           func() []refusedRoute // the routes detour refuses (unsupported_routes.go)
	// gateway is this waypoint's own Gateway (scope.go); only Discovery's snapshot reads it.
	gateway func() (*gwv1.Gateway, error)
}

// unsupportedInformers watches the kinds of Unsupported that the API server serves and this
// waypoint may read, in the namespace it discovers and, when that is one namespace, in the
// mesh's root namespace too (where mesh-wide EnvoyFilters, WasmPlugins, DestinationRules and
// Telemetry live). Each kind and namespace is checked with one list first: an informer on a kind
// it may not list would never sync, and discovery would never be ready. One it cannot read is
// logged once and left out. It returns the factories to start (none when nothing is watched).
func (d *Discovery) unsupportedInformers(ctx context.Context, opts []istioinformers.SharedInformerOption, handler cache.ResourceEventHandler) ([]istioinformers.SharedInformerFactory, unsupportedListers) {
	var u unsupportedListers
	var out []istioinformers.SharedInformerFactory
	if f, ok := d.unsupportedIn(ctx, d.Namespace, false, opts, handler, &u); ok {
		out = append(out, f)
	}
	if root := d.rootNamespace(); d.Namespace != "" && root != d.Namespace {
		ropts := []istioinformers.SharedInformerOption{istioinformers.WithNamespace(root)}
		if f, ok := d.unsupportedIn(ctx, root, true, ropts, handler, &u); ok {
			out = append(out, f)
		}
	}
	return out, u
}

// unsupportedIn registers, on a factory for namespace ns ("" all), the informers of the kinds
// it may read, adding their listers to u's (ok: at least one is watched). In the root
// namespace (root) VirtualServices are not watched: one there applies to no waypoint's service
// (and the installed Role there does not read them).
func (d *Discovery) unsupportedIn(ctx context.Context, ns string, root bool, opts []istioinformers.SharedInformerOption, handler cache.ResourceEventHandler, u *unsupportedListers) (istioinformers.SharedInformerFactory, bool) {
	f := istioinformers.NewSharedInformerFactoryWithOptions(d.Istio, 0, opts...)
	lo := metav1.ListOptions{Limit: 1}
	watched := false
	// readable watches a kind its list could read; informer is called only then (calling it
	// registers the informer with the factory, whose sync would then wait for it).
	readable := func(kind string, err error, informer func() cache.SharedIndexInformer) bool {
		if err != nil {
			d.log().Warn("mesh: cannot read "+kind+"s; those that would apply to bound services are not reported", "namespace", ns, "err", err)
			return false
		}
		if _, err := informer().AddEventHandler(handler); err != nil {
			d.log().Warn("mesh: cannot watch "+kind+"s", "namespace", ns, "err", err)
			return false
		}
		watched = true
		return true
	}
	if !root {
		if _, err := d.Istio.NetworkingV1().VirtualServices(ns).List(ctx, lo); readable("VirtualService", err, f.Networking().V1().VirtualServices().Informer) {
			u.virtualServices = joinLists(u.virtualServices, f.Networking().V1().VirtualServices().Lister().List)
		}
	}
	if _, err := d.Istio.NetworkingV1().DestinationRules(ns).List(ctx, lo); readable("DestinationRule", err, f.Networking().V1().DestinationRules().Informer) {
		u.destinationRules = joinLists(u.destinationRules, f.Networking().V1().DestinationRules().Lister().List)
	}
	if _, err := d.Istio.NetworkingV1alpha3().EnvoyFilters(ns).List(ctx, lo); readable("EnvoyFilter", err, f.Networking().V1alpha3().EnvoyFilters().Informer) {
		u.envoyFilters = joinLists(u.envoyFilters, f.Networking().V1alpha3().EnvoyFilters().Lister().List)
	}
	if _, err := d.Istio.ExtensionsV1alpha1().WasmPlugins(ns).List(ctx, lo); readable("WasmPlugin", err, f.Extensions().V1alpha1().WasmPlugins().Informer) {
		u.wasmPlugins = joinLists(u.wasmPlugins, f.Extensions().V1alpha1().WasmPlugins().Lister().List)
	}
	if _, err := d.Istio.ExtensionsV1alpha1().TrafficExtensions(ns).List(ctx, lo); readable("TrafficExtension", err, f.Extensions().V1alpha1().TrafficExtensions().Informer) {
		u.extensions = joinLists(u.extensions, f.Extensions().V1alpha1().TrafficExtensions().Lister().List)
	}
	if _, err := d.Istio.TelemetryV1().Telemetries(ns).List(ctx, lo); readable("Telemetry", err, f.Telemetry().V1().Telemetries().Informer) {
		u.telemetries = joinLists(u.telemetries, f.Telemetry().V1().Telemetries().Lister().List)
	}
	return f, watched
}

// joinLists is a lister of prev's objects (nil: none) and then list's.
func joinLists[T any](prev func() ([]*T, error), list func(labels.Selector) ([]*T, error)) func() ([]*T, error) {
	return func() ([]*T, error) {
		var out []*T
		if prev != nil {
			p, err := prev()
			if err != nil {
				return nil, err
			}
			out = p
		}
		l, err := list(labels.Everything())
		if err != nil {
			return nil, err
		}
		return append(slices.Clip(out), l...), nil
	}
}

// findUnsupported lists, by kind, namespace and name, the objects of u that would apply to the
// bound services of table as Istio's waypoint applies them.
func (d *Discovery) findUnsupported(u unsupportedListers, table *route.Table) ([]Unsupported, error) {
	var bound []*route.Service
	for _, s := range table.Services() {
		if !s.Unbound && !s.Self {
			bound = append(bound, s)
		}
	}
	out, err := applies{ns: d.Waypoint.Namespace, gateway: d.Waypoint.Gateway, root: d.rootNamespace(), bound: bound}.find(u)
	if err != nil {
		return nil, err
	}
	gw, err := d.gatewayScope(u.gateway)
	if err != nil || gw == nil {
		return out, err
	}
	return sortUnsupported(append(out, *gw)), nil
}

// find lists, by kind, namespace and name, the objects of u that apply to a.bound.
func (a applies) find(u unsupportedListers) ([]Unsupported, error) {
	var out []Unsupported
	add := func(kind string, m metav1.ObjectMeta, svcs []*route.Service) {
		a.add(&out, kind, m, svcs, differs[kind])
	}
	if u.virtualServices != nil {
		list, err := u.virtualServices()
		if err != nil {
			return nil, err
		}
		for _, o := range list {
			add("VirtualService", o.ObjectMeta, a.virtualService(o))
		}
	}
	if u.destinationRules != nil {
		list, err := u.destinationRules()
		if err != nil {
			return nil, err
		}
		for _, o := range list {
			add("DestinationRule", o.ObjectMeta, a.destinationRule(o))
		}
	}
	if u.envoyFilters != nil {
		list, err := u.envoyFilters()
		if err != nil {
			return nil, err
		}
		for _, o := range list {
			add("EnvoyFilter", o.ObjectMeta, a.proxyWide(o.Namespace, o.Spec.GetWorkloadSelector().GetLabels(), o.Spec.GetTargetRefs()))
		}
	}
	if u.wasmPlugins != nil {
		list, err := u.wasmPlugins()
		if err != nil {
			return nil, err
		}
		for _, o := range list {
			refs := o.Spec.GetTargetRefs()
			if len(refs) == 0 && o.Spec.GetTargetRef() != nil {
				refs = []*typev1beta1.PolicyTargetReference{o.Spec.GetTargetRef()}
			}
			add("WasmPlugin", o.ObjectMeta, a.proxyWide(o.Namespace, o.Spec.GetSelector().GetMatchLabels(), refs))
		}
	}
	if u.extensions != nil {
		list, err := u.extensions()
		if err != nil {
			return nil, err
		}
		for _, o := range list {
			add("TrafficExtension", o.ObjectMeta, a.proxyWide(o.Namespace, o.Spec.GetSelector().GetMatchLabels(), o.Spec.GetTargetRefs()))
		}
	}
	if u.telemetries != nil {
		list, err := u.telemetries()
		if err != nil {
			return nil, err
		}
		for _, o := range list {
			if what := telemetryDiffers(&o.Spec); what != "" {
				a.add(&out, "Telemetry", o.ObjectMeta, a.proxyWide(o.Namespace, o.Spec.GetSelector().GetMatchLabels(), telemetryRefs(o)), what)
			}
		}
	}
	if u.routes != nil {
		a.routes(&out, u.routes())
	}
	return sortUnsupported(out), nil
}

// sortUnsupported orders list by kind, namespace and name.
func sortUnsupported(list []Unsupported) []Unsupported {
	slices.SortFunc(list, func(x, y Unsupported) int {
		return cmp.Or(strings.Compare(x.Kind, y.Kind), strings.Compare(x.Namespace, y.Namespace), strings.Compare(x.Name, y.Name))
	})
	return list
}

// add appends kind m to out when it applies to svcs (none: nothing to report).
func (applies) add(out *[]Unsupported, kind string, m metav1.ObjectMeta, svcs []*route.Service, differs string) {
	if len(svcs) == 0 {
		return
	}
	names := make([]string, 0, len(svcs))
	for _, s := range svcs {
		names = append(names, s.Namespace+"/"+s.Name)
	}
	*out = append(*out, Unsupported{Kind: kind, Namespace: m.Namespace, Name: m.Name, Services: names, Differs: differs})
}

// applies decides which bound services an object would apply to at Istio's waypoint.
type applies struct {
	ns, gateway, root string // the waypoint's namespace and Gateway, the mesh's root namespace
	bound             []*route.Service
}

// virtualService: as istiod's getVirtualServiceForWaypoint (pilot/pkg/networking/core/
// listener_waypoint.go): a VirtualService of the mesh (spec.gateways empty or naming "mesh"),
// exported to the waypoint's namespace, in the service's namespace or the waypoint's, with a
// host that matches the service's hostname (short names are the VirtualService's namespace's,
// as istiod resolves them).
func (a applies) virtualService(vs *networkingv1.VirtualService) []*route.Service {
	if gws := vs.Spec.GetGateways(); len(gws) > 0 && !slices.Contains(gws, "mesh") {
		return nil
	}
	if !exported(vs.Spec.GetExportTo(), vs.Namespace, a.ns) {
		return nil
	}
	var out []*route.Service
	for _, s := range a.bound {
		if vs.Namespace != s.Namespace && vs.Namespace != a.ns {
			continue
		}
		if slices.ContainsFunc(vs.Spec.GetHosts(), func(h string) bool { return hostMatches(fqdn(h, vs.Namespace), s.Hostname) }) {
			out = append(out, s)
		}
	}
	return out
}

// destinationRule: one exported to the waypoint's namespace, from the waypoint's namespace,
// the service's or the root namespace (where istiod looks a proxy's DestinationRules up), whose
// host matches the service's hostname.
func (a applies) destinationRule(dr *networkingv1.DestinationRule) []*route.Service {
	if !exported(dr.Spec.GetExportTo(), dr.Namespace, a.ns) {
		return nil
	}
	var out []*route.Service
	for _, s := range a.bound {
		if dr.Namespace != s.Namespace && dr.Namespace != a.ns && dr.Namespace != a.root {
			continue
		}
		if hostMatches(fqdn(dr.Spec.GetHost(), dr.Namespace), s.Hostname) {
			out = append(out, s)
		}
	}
	return out
}

// proxyWide: an EnvoyFilter, WasmPlugin or TrafficExtension in namespace ns applies to the waypoint (every bound
// service) when it selects nothing (then in the root namespace: every proxy; in the waypoint's:
// every proxy there), when its selector's labels are the waypoint's (Istio's waypoint pods carry
// gateway.networking.k8s.io/gateway-name; detour's app.kubernetes.io/name), or when a targetRef
// names the waypoint's Gateway or the istio-waypoint GatewayClass (as proxy/authz binds
// policies); a targetRef naming a Service applies to that service.
func (a applies) proxyWide(ns string, selector map[string]string, refs []*typev1beta1.PolicyTargetReference) []*route.Service {
	if ns != a.ns && ns != a.root && len(refs) == 0 {
		return nil
	}
	if len(refs) == 0 {
		own := map[string]string{"gateway.networking.k8s.io/gateway-name": a.gateway, "istio.io/gateway-name": a.gateway, "app.kubernetes.io/name": a.gateway}
		for k, v := range selector {
			if own[k] != v {
				return nil
			}
		}
		return a.bound
	}
	var out []*route.Service
	for _, r := range refs {
		if r.GetNamespace() != "" && r.GetNamespace() != ns {
			continue
		}
		group, kind, name := r.GetGroup(), r.GetKind(), r.GetName()
		switch {
		case group == "gateway.networking.k8s.io" && kind == "Gateway" && ns == a.ns && name == a.gateway,
			group == "gateway.networking.k8s.io" && kind == "GatewayClass" && ns == a.root && name == "istio-waypoint":
			return a.bound
		case (group == "" || group == "core") && kind == "Service":
			for _, s := range a.bound {
				if s.Namespace == ns && s.Name == name && !slices.Contains(out, s) {
					out = append(out, s)
				}
			}
		}
	}
	return out
}

// exported: exportTo (default: every namespace) lets namespace to see an object of namespace ns.
func exported(exportTo []string, ns, to string) bool {
	if len(exportTo) == 0 || slices.Contains(exportTo, "*") || slices.Contains(exportTo, to) {
		return true
	}
	return slices.Contains(exportTo, ".") && ns == to
}

// fqdn resolves a host as istiod does: a name without a dot is short for one in namespace ns.
func fqdn(host, ns string) string {
	if host == "*" || strings.Contains(host, ".") {
		return host
	}
	return host + "." + ns + ".svc.cluster.local"
}

// hostMatches: host (exact, *, or *.suffix) names hostname.
func hostMatches(host, hostname string) bool {
	switch {
	case host == "*":
		return true
	case strings.HasPrefix(host, "*."):
		return strings.HasSuffix(hostname, host[1:])
	}
	return strings.EqualFold(host, hostname)
}

// reportUnsupported logs each object that is new or changed since the last snapshot (one
// warning per object, not one per rebuild) and hands the list to d.UnsupportedConfig.
func (d *Discovery) reportUnsupported(list []Unsupported) {
	seen := make(map[string]string, len(list))
	for _, u := range list {
		key, services := u.Kind+" "+u.Namespace+"/"+u.Name, strings.Join(u.Services, ",")
		seen[key] = services
		if d.reported[key] != services {
			d.log().Warn(fmt.Sprintf("mesh: %s %s/%s applies to services bound to this waypoint and detour does not implement it: %s", u.Kind, u.Namespace, u.Name, u.Differs),
				"kind", u.Kind, "namespace", u.Namespace, "name", u.Name, "services", services)
		}
	}
	d.reported = seen
	d.unsup.Store(&list)
	if d.UnsupportedConfig != nil {
		d.UnsupportedConfig(list)
	}
}

// logRefused warns, once per route and reason, of the refused routes that apply to no bound
// service (those that do are in reported, warned of by reportUnsupported): not applied either,
// so never silent.
func (d *Discovery) logRefused(refused []refusedRoute, reported []Unsupported) {
	in := make(map[string]bool, len(reported))
	for _, u := range reported {
		in[u.Kind+" "+u.Namespace+"/"+u.Name] = true
	}
	seen := make(map[string]string, len(refused))
	for _, r := range refused {
		key := r.kind + " " + r.meta.Namespace + "/" + r.meta.Name
		if in[key] {
			continue
		}
		seen[key] = r.reason
		if d.logged[key] != r.reason {
			d.log().Warn(fmt.Sprintf("mesh: %s %s/%s not applied: %s", r.kind, r.meta.Namespace, r.meta.Name, r.reason),
				"kind", r.kind, "namespace", r.meta.Namespace, "name", r.meta.Name)
		}
	}
	d.logged = seen
}

// UnsupportedFor is what would be reported for service namespace/name were it bound to this
// waypoint (a debug session's --bind asks before binding); nothing before discovery synced.
func (d *Discovery) UnsupportedFor(namespace, name string) ([]Unsupported, error) {
	u := d.unsupListers.Load()
	if u == nil {
		return nil, nil
	}
	svc := &route.Service{Namespace: namespace, Name: name, Hostname: name + "." + namespace + ".svc.cluster.local"}
	return applies{ns: d.Waypoint.Namespace, gateway: d.Waypoint.Gateway, root: d.rootNamespace(), bound: []*route.Service{svc}}.find(*u)
}

// RefuseUnsupported is the error a bind refused for list gets: each object, what differs, and
// how to bind anyway (force names the flag that does).
func RefuseUnsupported(target string, list []Unsupported, force string) error {
	return fmt.Errorf("mesh: not binding %s: Istio config that detour does not implement applies to it, so its callers' traffic would change; remove it or pass %s:%s",
		target, force, describeUnsupported(list))
}
