package mesh

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Which services can have this waypoint, and so whose routes it must read.
//
// istiod attaches a service (or namespace) labelled istio.io/use-waypoint to a waypoint only when
// the Gateway's HBONE listener (port 15008) admits the labelled object's namespace: its
// allowedRoutes.namespaces, default Same (pilot/pkg/serviceregistry/ambient/waypoints.go,
// makeAllowedRoutes and AllowsAttachmentFromNamespace). The Gateway detour install writes has no
// allowedRoutes, so only the waypoint's own namespace's services attach, and the installed
// waypoint's discovery (that one namespace, a namespaced Role) reads every route Istio's waypoint
// would apply to them (the service's namespace and the waypoint's are one). A Gateway changed to
// admit other namespaces lets their services attach while a one-namespace discovery sees neither
// them nor their routes: their streams are refused (unknown destination). That is reported as
// Unsupported (kind Gateway), not left silent.

// admitsOthers says what a one-namespace waypoint (discovering namespace ns) misses because gw's
// mesh listener admits services of other namespaces; "" when it admits only its own.
func admitsOthers(gw *gwv1.Gateway, ns string) string {
	for _, l := range gw.Spec.Listeners {
		if l.Protocol != "HBONE" || l.Port != 15008 {
			continue
		}
		from := gwv1.NamespacesFromSame
		if a := l.AllowedRoutes; a != nil && a.Namespaces != nil && a.Namespaces.From != nil {
			from = *a.Namespaces.From
		}
		if from == gwv1.NamespacesFromSame {
			return ""
		}
		return fmt.Sprintf("its HBONE listener admits services of other namespaces (allowedRoutes.namespaces.from: %s), so istiod attaches them to this waypoint, "+
			"but the waypoint discovers namespace %s only: their streams are refused (unknown destination) and their routes are not read; "+
			"keep allowedRoutes.namespaces.from: Same (the default detour install writes), or run the waypoint with discovery.kubernetes.namespace \"\" and cluster-wide read access", from, ns)
	}
	return ""
}

// gatewayLister watches the Gateways of the discovered namespace (one namespace only: a
// waypoint discovering all reads every service and route anyway) and returns the lister of this
// waypoint's own Gateway; nil when not watched (all namespaces, no Gateway kind served, or not
// readable: logged once).
func (d *Discovery) gatewayLister(ctx context.Context, ri *routeInformers, handler cache.ResourceEventHandler) func() (*gwv1.Gateway, error) {
	if d.Namespace == "" || ri.factory == nil || !ri.served["Gateway"] {
		return nil
	}
	if _, err := d.Gateway.GatewayV1().Gateways(d.Namespace).List(ctx, metav1.ListOptions{Limit: 1}); err != nil {
		d.log().Warn("mesh: cannot read Gateways; whether this waypoint's Gateway admits services of other namespaces is not checked", "namespace", d.Namespace, "err", err)
		return nil
	}
	inf := ri.factory.Gateway().V1().Gateways()
	if _, err := inf.Informer().AddEventHandler(handler); err != nil {
		d.log().Warn("mesh: cannot watch Gateways", "namespace", d.Namespace, "err", err)
		return nil
	}
	return func() (*gwv1.Gateway, error) {
		return inf.Lister().Gateways(d.Waypoint.Namespace).Get(d.Waypoint.Gateway)
	}
}

// gatewayScope is the Unsupported entry for this waypoint's Gateway when it admits services
// that a one-namespace discovery cannot see (admitsOthers); nil otherwise.
func (d *Discovery) gatewayScope(gateway func() (*gwv1.Gateway, error)) (*Unsupported, error) {
	if gateway == nil {
		return nil, nil
	}
	gw, err := gateway()
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	what := admitsOthers(gw, d.Namespace)
	if what == "" {
		return nil, nil
	}
	return &Unsupported{Kind: "Gateway", Namespace: gw.Namespace, Name: gw.Name, Services: []string{"services of other namespaces"}, Differs: what}, nil
}
