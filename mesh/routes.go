package mesh

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1alpha2 "sigs.k8s.io/gateway-api/apis/v1alpha2"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
)

func meta(ns, name string, created time.Time) httproute.Metadata {
	return httproute.Metadata{Namespace: ns, Name: name, CreationTimestamp: created}
}

// gatewayGroupVersion serves the HTTPRoutes and GRPCRoutes istiod reads for waypoints.
const gatewayGroupVersion = "gateway.networking.k8s.io/v1"

// gatewayAlphaVersion serves TCPRoutes and TLSRoutes on clusters whose Gateway API CRDs predate
// their v1 (experimental channel before v1.5); istiod reads v1.
const gatewayAlphaVersion = "gateway.networking.k8s.io/v1alpha2"

// routeInformers watches HTTPRoutes, GRPCRoutes, TCPRoutes and TLSRoutes, the kinds the API
// server serves (a cluster without the Gateway API CRDs, or without one kind, has none of that
// kind: nothing to wait for).
type routeInformers struct {
	factory gwinformers.SharedInformerFactory
	http    func() ([]*gwv1.HTTPRoute, error)
	grpc    func() ([]*gwv1.GRPCRoute, error)
	tcp     func() ([]l4Object, error)
	tls     func() ([]l4Object, error)
	served  map[string]bool // the kinds gatewayGroupVersion serves
}

// l4Object is a TCPRoute or TLSRoute of either version, converted in compileL4Routes.
type l4Object struct {
	meta metav1.ObjectMeta
	spec any // gwv1 or gwv1alpha2 TCPRouteSpec or TLSRouteSpec
}

// servedKinds are the kinds the API server serves in groupVersion (none when it serves none).
func servedKinds(d *Discovery, groupVersion string) map[string]bool {
	kinds := map[string]bool{}
	if list, err := d.Kube.Discovery().ServerResourcesForGroupVersion(groupVersion); err == nil {
		for _, r := range list.APIResources {
			kinds[r.Kind] = true
		}
	}
	return kinds
}

func (d *Discovery) routeInformers(handler cache.ResourceEventHandler) (*routeInformers, error) {
	ri := &routeInformers{
		http: func() ([]*gwv1.HTTPRoute, error) { return nil, nil },
		grpc: func() ([]*gwv1.GRPCRoute, error) { return nil, nil },
		tcp:  func() ([]l4Object, error) { return nil, nil },
		tls:  func() ([]l4Object, error) { return nil, nil },
	}
	if d.Gateway == nil {
		return ri, nil
	}
	served := servedKinds(d, gatewayGroupVersion)
	ri.served = served
	var opts []gwinformers.SharedInformerOption
	if d.Namespace != "" {
		opts = append(opts, gwinformers.WithNamespace(d.Namespace))
	}
	ri.factory = gwinformers.NewSharedInformerFactoryWithOptions(d.Gateway, 0, opts...)
	v1 := ri.factory.Gateway().V1()
	if served["HTTPRoute"] {
		inf := v1.HTTPRoutes()
		if _, err := inf.Informer().AddEventHandler(handler); err != nil {
			return nil, fmt.Errorf("mesh: %w", err)
		}
		ri.http = func() ([]*gwv1.HTTPRoute, error) { return inf.Lister().List(labels.Everything()) }
	} else {
		d.log().Info("mesh: the API server serves no HTTPRoute (" + gatewayGroupVersion + "); none applies")
	}
	if served["GRPCRoute"] {
		inf := v1.GRPCRoutes()
		if _, err := inf.Informer().AddEventHandler(handler); err != nil {
			return nil, fmt.Errorf("mesh: %w", err)
		}
		ri.grpc = func() ([]*gwv1.GRPCRoute, error) { return inf.Lister().List(labels.Everything()) }
	}
	return ri, d.l4Informers(ri, served, handler)
}

// l4Informers watches TCPRoutes and TLSRoutes: v1 where served, else v1alpha2.
func (d *Discovery) l4Informers(ri *routeInformers, served map[string]bool, handler cache.ResourceEventHandler) error {
	alpha := served
	if !served["TCPRoute"] || !served["TLSRoute"] {
		alpha = servedKinds(d, gatewayAlphaVersion)
	}
	v1, v1a2 := ri.factory.Gateway().V1(), ri.factory.Gateway().V1alpha2()
	watch := func(inf cache.SharedIndexInformer) error {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return fmt.Errorf("mesh: %w", err)
		}
		return nil
	}
	switch {
	case served["TCPRoute"]:
		inf := v1.TCPRoutes()
		ri.tcp = lister(inf.Lister().List, func(r *gwv1.TCPRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} })
		if err := watch(inf.Informer()); err != nil {
			return err
		}
	case alpha["TCPRoute"]:
		inf := v1a2.TCPRoutes()
		ri.tcp = lister(inf.Lister().List, func(r *gwv1alpha2.TCPRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} })
		if err := watch(inf.Informer()); err != nil {
			return err
		}
	}
	switch {
	case served["TLSRoute"]:
		inf := v1.TLSRoutes()
		ri.tls = lister(inf.Lister().List, func(r *gwv1.TLSRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} })
		return watch(inf.Informer())
	case alpha["TLSRoute"]:
		inf := v1a2.TLSRoutes()
		ri.tls = lister(inf.Lister().List, func(r *gwv1alpha2.TLSRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} })
		return watch(inf.Informer())
	}
	return nil
}

// lister lists a kind's objects as l4Objects.
func lister[T any](list func(labels.Selector) ([]T, error), of func(T) l4Object) func() ([]l4Object, error) {
	return func() ([]l4Object, error) {
		items, err := list(labels.Everything())
		if err != nil {
			return nil, err
		}
		out := make([]l4Object, 0, len(items))
		for _, o := range items {
			out = append(out, of(o))
		}
		return out, nil
	}
}

func (ri *routeInformers) sync(ctx context.Context) error {
	if ri.factory == nil {
		return nil
	}
	for typ, ok := range ri.factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return errors.Join(ctx.Err(), fmt.Errorf("mesh: %v never synced", typ))
		}
	}
	return nil
}

// compileRoutes converts the watched routes into proxy/httproute's and proxy/l4route's types
// and compiles them against table. A route using a field detour does not implement, or one
// its compiler refuses, is left out whole rather than applied without it, and returned as
// refused (reported by findUnsupported and logRefused).
func (d *Discovery) compileRoutes(l listers, table *route.Table) (*httproute.Table, *l4route.Table, []refusedRoute, error) {
	hs, err := l.httpRoutes()
	if err != nil {
		return nil, nil, nil, err
	}
	gs, err := l.grpcRoutes()
	if err != nil {
		return nil, nil, nil, err
	}
	tcps, err := l.tcpRoutes()
	if err != nil {
		return nil, nil, nil, err
	}
	tlss, err := l.tlsRoutes()
	if err != nil {
		return nil, nil, nil, err
	}
	c := convertRoutes(hs, gs, tcps, tlss)
	ht, herr := httproute.Compile(table, d.Waypoint.Namespace, c.http, c.grpc)
	lt, lerr := l4route.Compile(table, d.Waypoint.Namespace, c.tcp, c.tls)
	d.logOutOfScope(append(ht.OutOfScope(), lt.OutOfScope()...))
	refused := append(append(c.refused, refusedBy(herr, c.byKey)...), refusedBy(lerr, c.byKey)...)
	for _, err := range []error{herr, lerr} {
		if err != nil && len(refusedBy(err, c.byKey)) == 0 {
			d.log().Warn("mesh: routes not applied", "err", err) // no route named: not reported otherwise
		}
	}
	return ht, lt, refused, nil
}

// logOutOfScope logs, once per route and parent, the routes this waypoint does not apply because
// of their namespace (neither the parent Service's nor the waypoint's: httproute.Scope). Not a
// warning: Istio's waypoint leaves them out too; they are consumer routes, which only sidecars
// apply. Only a waypoint discovering every namespace reads such routes.
func (d *Discovery) logOutOfScope(routes []httproute.OutOfScope) {
	seen := make(map[string]bool, len(routes))
	for _, r := range routes {
		key := r.String()
		seen[key] = true
		if !d.scoped[key] {
			d.log().Info("mesh: "+key+" not applied: a waypoint applies only routes in the service's namespace or its own, as Istio's does",
				"kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "service", r.Service)
		}
	}
	d.scoped = seen
}

// HTTPRoute converts a gateway-api HTTPRoute into proxy/httproute's (see convert).
func HTTPRoute(h *gwv1.HTTPRoute) (*httproute.HTTPRoute, error) {
	r := &httproute.HTTPRoute{Metadata: meta(h.Namespace, h.Name, h.CreationTimestamp.Time)}
	if err := convert(h.Spec, &r.Spec); err != nil {
		return nil, err
	}
	return r, nil
}

// GRPCRoute converts a gateway-api GRPCRoute into proxy/httproute's (see convert).
func GRPCRoute(g *gwv1.GRPCRoute) (*httproute.GRPCRoute, error) {
	r := &httproute.GRPCRoute{Metadata: meta(g.Namespace, g.Name, g.CreationTimestamp.Time)}
	if err := convert(g.Spec, &r.Spec); err != nil {
		return nil, err
	}
	return r, nil
}

// convert moves a gateway-api spec into detour's types through JSON, strictly: a field set in
// the object that detour's types lack is an error.
func convert(spec, into any) error {
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(into); err != nil {
		if f := unknownField(b, into); f != "" {
			return fmt.Errorf("mesh: %s", f)
		}
		return fmt.Errorf("mesh: a field detour does not implement: %w", err)
	}
	return nil
}
