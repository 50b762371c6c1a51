package mesh

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"regexp"
	"strings"

	"go.yaml.in/yaml/v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1alpha2 "sigs.k8s.io/gateway-api/apis/v1alpha2"

	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
)

// refusedRoute is a watched HTTPRoute, GRPCRoute, TCPRoute or TLSRoute that detour does not
// apply (a field it does not implement, a filter type it does not handle, or a value its
// compiler refuses): left out whole, so the traffic of the services it names goes as if it did
// not exist. Reported as Unsupported for the bound services its parentRefs name.
type refusedRoute struct {
	kind    string
	meta    metav1.ObjectMeta
	parents []httproute.ParentRef
	reason  string // names the field
}

// routeDiffers prefixes a refused route's reason in Unsupported.Differs.
const routeDiffers = "not applied (Istio's waypoint applies it; detour routes as if it did not exist): "

// routes lists, as Unsupported, the refused routes whose parentRefs name a bound service.
func (a applies) routes(out *[]Unsupported, refused []refusedRoute) {
	for _, r := range refused {
		var svcs []*route.Service
		for _, p := range r.parents {
			if !p.IsService() {
				continue
			}
			pns := r.meta.Namespace
			if p.Namespace != nil {
				pns = *p.Namespace
			}
			for _, s := range a.bound {
				if s.Namespace == pns && s.Name == p.Name && !containsService(svcs, s) {
					svcs = append(svcs, s)
				}
			}
		}
		a.add(out, r.kind, r.meta, svcs, routeDiffers+r.reason)
	}
}

func containsService(list []*route.Service, s *route.Service) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// parentsOf reads the parentRefs of a Gateway API route spec (any kind, any version).
func parentsOf(spec any) []httproute.ParentRef {
	var p struct {
		ParentRefs []httproute.ParentRef `json:"parentRefs"`
	}
	if b, err := json.Marshal(spec); err == nil {
		_ = json.Unmarshal(b, &p) // the same JSON shape in every kind
	}
	return p.ParentRefs
}

// refusedBy are the routes whose compile error err (Compile's, joined) names, with the
// parents of each as byKey (kind namespace/name) has them.
func refusedBy(err error, byKey map[string]refusedRoute) []refusedRoute {
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else if err != nil {
		errs = []error{err}
	}
	var out []refusedRoute
	for _, e := range errs {
		var re *httproute.RouteError
		if !errors.As(e, &re) {
			continue
		}
		r, ok := byKey[re.Kind+" "+re.Namespace+"/"+re.Name]
		if !ok {
			continue
		}
		r.reason = re.Err.Error()
		out = append(out, r)
	}
	return out
}

// convertedRoutes are the routes of one snapshot in proxy/'s types, and those refused.
type convertedRoutes struct {
	http    []*httproute.HTTPRoute
	grpc    []*httproute.GRPCRoute
	tcp     []*l4route.TCPRoute
	tls     []*l4route.TLSRoute
	byKey   map[string]refusedRoute // every route, by kind namespace/name (reason unset)
	refused []refusedRoute          // refused in conversion
}

func (c *convertedRoutes) note(kind string, m metav1.ObjectMeta, spec any, err error) bool {
	r := refusedRoute{kind: kind, meta: m, parents: parentsOf(spec)}
	if c.byKey == nil {
		c.byKey = map[string]refusedRoute{}
	}
	c.byKey[kind+" "+m.Namespace+"/"+m.Name] = r
	if err != nil {
		r.reason = strings.TrimPrefix(err.Error(), "mesh: ")
		c.refused = append(c.refused, r)
		return false
	}
	return true
}

// convertRoutes converts the gateway-api objects into proxy/'s types, noting the refused.
func convertRoutes(hs []*gwv1.HTTPRoute, gs []*gwv1.GRPCRoute, tcps, tlss []l4Object) *convertedRoutes {
	c := &convertedRoutes{}
	for _, h := range hs {
		if r, err := HTTPRoute(h); c.note("HTTPRoute", h.ObjectMeta, h.Spec, err) {
			c.http = append(c.http, r)
		}
	}
	for _, g := range gs {
		if r, err := GRPCRoute(g); c.note("GRPCRoute", g.ObjectMeta, g.Spec, err) {
			c.grpc = append(c.grpc, r)
		}
	}
	for _, o := range tcps {
		r := &l4route.TCPRoute{Metadata: meta(o.meta.Namespace, o.meta.Name, o.meta.CreationTimestamp.Time)}
		if c.note("TCPRoute", o.meta, o.spec, convert(o.spec, &r.Spec)) {
			c.tcp = append(c.tcp, r)
		}
	}
	for _, o := range tlss {
		r := &l4route.TLSRoute{Metadata: meta(o.meta.Namespace, o.meta.Name, o.meta.CreationTimestamp.Time)}
		if c.note("TLSRoute", o.meta, o.spec, convert(o.spec, &r.Spec)) {
			c.tls = append(c.tls, r)
		}
	}
	return c
}

// unknownField names, as a path from spec, the first field of the JSON document b that the
// type of into (a pointer to one of proxy/'s route specs) does not have; "" if none.
func unknownField(b []byte, into any) string {
	var n yaml.Node
	if err := yaml.NewDecoder(bytes.NewReader(b)).Decode(&n); err != nil || len(n.Content) == 0 {
		return ""
	}
	err := httproute.CheckFields(n.Content[0], reflect.TypeOf(into), "spec")
	if err == nil {
		return ""
	}
	return linePrefix.ReplaceAllString(err.Error(), "")
}

var linePrefix = regexp.MustCompile(`^line \d+: `)

// noServices is an empty service table: FindUnsupported compiles routes only for their errors.
type noServices struct{}

func (noServices) Service(string, string) *route.Service { return nil }

// findRefusedRoutes lists the routes in namespaces that detour would refuse (FindUnsupported:
// before anything is bound, so compiled against no services; a route's refusal does not depend
// on them). A kind not served is skipped.
func findRefusedRoutes(ctx context.Context, client dynamic.Interface, namespaces []string) ([]refusedRoute, error) {
	gvr := func(version, resource string) schema.GroupVersionResource {
		return schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: version, Resource: resource}
	}
	hs, err := listKind[gwv1.HTTPRoute](ctx, client, gvr("v1", "httproutes"), namespaces)
	if err != nil {
		return nil, err
	}
	gs, err := listKind[gwv1.GRPCRoute](ctx, client, gvr("v1", "grpcroutes"), namespaces)
	if err != nil {
		return nil, err
	}
	tcps, err := listL4[gwv1.TCPRoute, gwv1alpha2.TCPRoute](ctx, client, gvr, "tcproutes", namespaces,
		func(r *gwv1.TCPRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} }, func(r *gwv1alpha2.TCPRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} })
	if err != nil {
		return nil, err
	}
	tlss, err := listL4[gwv1.TLSRoute, gwv1alpha2.TLSRoute](ctx, client, gvr, "tlsroutes", namespaces,
		func(r *gwv1.TLSRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} }, func(r *gwv1alpha2.TLSRoute) l4Object { return l4Object{r.ObjectMeta, r.Spec} })
	if err != nil {
		return nil, err
	}
	var h []*gwv1.HTTPRoute
	var g []*gwv1.GRPCRoute
	if hs != nil {
		h, _ = hs()
	}
	if gs != nil {
		g, _ = gs()
	}
	c := convertRoutes(h, g, tcps, tlss)
	_, herr := httproute.Compile(noServices{}, "", c.http, c.grpc)
	_, lerr := l4route.Compile(noServices{}, "", c.tcp, c.tls)
	return append(append(c.refused, refusedBy(herr, c.byKey)...), refusedBy(lerr, c.byKey)...), nil
}

// listL4 lists a TCPRoute or TLSRoute resource in v1, else (not served) v1alpha2.
func listL4[V1, V1a2 any](ctx context.Context, client dynamic.Interface, gvr func(string, string) schema.GroupVersionResource, resource string, namespaces []string,
	of1 func(*V1) l4Object, of2 func(*V1a2) l4Object) ([]l4Object, error) {
	var out []l4Object
	l1, err := listKind[V1](ctx, client, gvr("v1", resource), namespaces)
	if err != nil {
		return nil, err
	}
	if l1 != nil {
		items, _ := l1()
		for _, o := range items {
			out = append(out, of1(o))
		}
		return out, nil
	}
	l2, err := listKind[V1a2](ctx, client, gvr("v1alpha2", resource), namespaces)
	if err != nil || l2 == nil {
		return nil, err
	}
	items, _ := l2()
	for _, o := range items {
		out = append(out, of2(o))
	}
	return out, nil
}
