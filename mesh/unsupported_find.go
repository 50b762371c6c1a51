package mesh

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	extensionsv1alpha1 "istio.io/client-go/pkg/apis/extensions/v1alpha1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	networkingv1alpha3 "istio.io/client-go/pkg/apis/networking/v1alpha3"
	telemetryv1 "istio.io/client-go/pkg/apis/telemetry/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/detour-mesh/detour/proxy/route"
)

// FindUnsupported is what the waypoint ns/gateway would report (its detour_unsupported_config
// gauge) once services are bound to it, asked before anything is bound: for `detour install
// --bind` and `detour doctor`. It reads each kind once in the waypoint's namespace and in the
// root namespace (where a mesh-wide EnvoyFilter, WasmPlugin or DestinationRule lives); a kind
// the API server does not serve is skipped. The Gateway API routes of the waypoint's namespace
// that detour would refuse are read there too (refusedRoute). A kind it may not read fails the check, naming it:
// a refusal that cannot see is no refusal.
func FindUnsupported(ctx context.Context, client dynamic.Interface, ns, gateway, root string, services []*route.Service) ([]Unsupported, error) {
	if root == "" {
		root = "istio-system"
	}
	namespaces := []string{ns}
	if root != ns {
		namespaces = append(namespaces, root)
	}
	var u unsupportedListers
	var err error
	if u.virtualServices, err = listKind[networkingv1.VirtualService](ctx, client, gvrVirtualService, namespaces); err != nil {
		return nil, err
	}
	if u.destinationRules, err = listKind[networkingv1.DestinationRule](ctx, client, gvrDestinationRule, namespaces); err != nil {
		return nil, err
	}
	if u.envoyFilters, err = listKind[networkingv1alpha3.EnvoyFilter](ctx, client, gvrEnvoyFilter, namespaces); err != nil {
		return nil, err
	}
	if u.wasmPlugins, err = listKind[extensionsv1alpha1.WasmPlugin](ctx, client, gvrWasmPlugin, namespaces); err != nil {
		return nil, err
	}
	if u.extensions, err = listKind[extensionsv1alpha1.TrafficExtension](ctx, client, gvrTrafficExtension, namespaces); err != nil {
		return nil, err
	}
	if u.telemetries, err = listKind[telemetryv1.Telemetry](ctx, client, gvrTelemetry, namespaces); err != nil {
		return nil, err
	}
	refused, err := findRefusedRoutes(ctx, client, []string{ns}) // routes live with the services
	if err != nil {
		return nil, err
	}
	u.routes = func() []refusedRoute { return refused }
	return applies{ns: ns, gateway: gateway, root: root, bound: services}.find(u)
}

var (
	gvrVirtualService   = schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1", Resource: "virtualservices"}
	gvrDestinationRule  = schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1", Resource: "destinationrules"}
	gvrEnvoyFilter      = schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1alpha3", Resource: "envoyfilters"}
	gvrWasmPlugin       = schema.GroupVersionResource{Group: "extensions.istio.io", Version: "v1alpha1", Resource: "wasmplugins"}
	gvrTrafficExtension = schema.GroupVersionResource{Group: "extensions.istio.io", Version: "v1alpha1", Resource: "trafficextensions"}
	gvrTelemetry        = schema.GroupVersionResource{Group: "telemetry.istio.io", Version: "v1", Resource: "telemetries"}
)

// listKind lists one kind in namespaces, decoded into its Istio type (nil: the kind is not
// served, nothing to report).
func listKind[T any](ctx context.Context, client dynamic.Interface, gvr schema.GroupVersionResource, namespaces []string) (func() ([]*T, error), error) {
	var out []*T
	for _, ns := range namespaces {
		list, err := client.Resource(gvr).Namespace(ns).List(ctx, metav1.ListOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return nil, nil // not served by this API server
		case err != nil:
			return nil, fmt.Errorf("mesh: listing %s in %s to find Istio config detour does not implement: %w", gvr.Resource, ns, err)
		}
		for _, item := range list.Items {
			b, err := json.Marshal(item.Object)
			if err != nil {
				return nil, fmt.Errorf("mesh: %s %s/%s: %w", gvr.Resource, item.GetNamespace(), item.GetName(), err)
			}
			obj := new(T)
			if err := json.Unmarshal(b, obj); err != nil {
				return nil, fmt.Errorf("mesh: decoding %s %s/%s: %w", gvr.Resource, item.GetNamespace(), item.GetName(), err)
			}
			out = append(out, obj)
		}
	}
	return func() ([]*T, error) { return out, nil }, nil
}

// describeUnsupported is one line per object: kind namespace/name (for which services): what differs.
func describeUnsupported(list []Unsupported) string {
	var b strings.Builder
	for _, u := range list {
		fmt.Fprintf(&b, "\n  %s %s/%s (on %s): %s", u.Kind, u.Namespace, u.Name, strings.Join(u.Services, ", "), u.Differs)
	}
	return b.String()
}
