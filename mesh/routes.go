package mesh

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/route"
)

func meta(ns, name string, created time.Time) httproute.Metadata {
	return httproute.Metadata{Namespace: ns, Name: name, CreationTimestamp: created}
}

// gatewayGroupVersion serves the HTTPRoutes and GRPCRoutes istiod reads for waypoints.
const gatewayGroupVersion = "gateway.networking.k8s.io/v1"

// routeInformers watches HTTPRoutes and GRPCRoutes, the kinds the API server serves (a cluster
// without the Gateway API CRDs, or without GRPCRoute, has none of that kind: nothing to wait for).
type routeInformers struct {
	factory gwinformers.SharedInformerFactory
	http    func() ([]*gwv1.HTTPRoute, error)
	grpc    func() ([]*gwv1.GRPCRoute, error)
}

func (d *Discovery) routeInformers(handler cache.ResourceEventHandler) (*routeInformers, error) {
	ri := &routeInformers{
		http: func() ([]*gwv1.HTTPRoute, error) { return nil, nil },
		grpc: func() ([]*gwv1.GRPCRoute, error) { return nil, nil },
	}
	if d.Gateway == nil {
		return ri, nil
	}
	served := map[string]bool{}
	if list, err := d.Kube.Discovery().ServerResourcesForGroupVersion(gatewayGroupVersion); err == nil {
		for _, r := range list.APIResources {
			served[r.Kind] = true
		}
	}
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
	return ri, nil
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

// compileRoutes converts the watched routes into proxy/httproute's types and compiles them
// against table. A route using a field detour does not implement is refused (logged, not
// applied) rather than applied without it.
func (d *Discovery) compileRoutes(l listers, table *route.Table) (*httproute.Table, error) {
	hs, err := l.httpRoutes()
	if err != nil {
		return nil, err
	}
	gs, err := l.grpcRoutes()
	if err != nil {
		return nil, err
	}
	var hrs []*httproute.HTTPRoute
	for _, h := range hs {
		r, err := HTTPRoute(h)
		if err != nil {
			d.log().Warn("mesh: HTTPRoute not applied", "namespace", h.Namespace, "name", h.Name, "err", err)
			continue
		}
		hrs = append(hrs, r)
	}
	var grs []*httproute.GRPCRoute
	for _, g := range gs {
		r, err := GRPCRoute(g)
		if err != nil {
			d.log().Warn("mesh: GRPCRoute not applied", "namespace", g.Namespace, "name", g.Name, "err", err)
			continue
		}
		grs = append(grs, r)
	}
	t, err := httproute.Compile(table, hrs, grs)
	if err != nil {
		d.log().Warn("mesh: routes not applied", "err", err) // the others are
	}
	return t, nil
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
		return fmt.Errorf("mesh: a field detour does not implement: %w", err)
	}
	return nil
}
