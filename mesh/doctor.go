package mesh

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

// Finding is one check of Doctor: what was looked at, whether it is fine, and the fix.
type Finding struct {
	Check string
	OK    bool
	Say   string // what was found
	Fix   string // what to do, when not OK
}

// Doctor explains why traffic would not reach detour's waypoint, one finding per check.
type Doctor struct {
	Kube      kubernetes.Interface
	Dynamic   dynamic.Interface
	Istio     istioclient.Interface
	Namespace string
	Name      string // the waypoint; default "detour"
	// Service, if set, is the service traffic should be taken from.
	Service string
	// Developer, if set (a SPIFFE ID without spiffe://), is checked for a STEAL grant on Service.
	Developer string
	// Ambientz, if set, is istiod's /debug/ambientz URL, to read what ztunnel is told.
	Ambientz string
	// Version, if set, is the CLI's version, compared with the waypoint's (doctor_install.go).
	Version string
	// RootNamespace is istiod's root namespace, where mesh-wide Istio config lives (the
	// unsupported check reads it); default istio-system.
	RootNamespace string
}

var gvrGateway = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}

func (d *Doctor) name() string {
	if d.Name == "" {
		return "detour"
	}
	return d.Name
}

// Check makes every check once; it fails only when the cluster cannot be read at all.
func (d *Doctor) Check(ctx context.Context) ([]Finding, error) {
	var out []Finding
	add := func(f Finding) { out = append(out, f) }
	ns, err := d.Kube.CoreV1().Namespaces().Get(ctx, d.Namespace, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("mesh: reading namespace %s: %w", d.Namespace, err)
	}
	host := d.name() + "." + d.Namespace + ".svc.cluster.local"

	// The namespace is in the ambient mesh.
	if ns.Labels["istio.io/dataplane-mode"] == "ambient" {
		add(Finding{Check: "ambient", OK: true, Say: "namespace " + d.Namespace + " is in ambient mode"})
	} else {
		add(Finding{Check: "ambient", Say: "namespace " + d.Namespace + " is not in ambient mode: ztunnel does not carry its traffic",
			Fix: "kubectl label namespace " + d.Namespace + " istio.io/dataplane-mode=ambient"})
	}

	// The APIs, the image and the version (doctor_install.go).
	d.checkInstall(ctx, add)

	// The Gateway exists and istiod programmed it.
	gw, err := d.Dynamic.Resource(gvrGateway).Namespace(d.Namespace).Get(ctx, d.name(), metav1.GetOptions{})
	switch {
	case err != nil:
		add(Finding{Check: "gateway", Say: fmt.Sprintf("no Gateway %s/%s: %v", d.Namespace, d.name(), err),
			Fix: "detour install -n " + d.Namespace})
	case !gatewayProgrammed(gw.Object):
		add(Finding{Check: "gateway", Say: fmt.Sprintf("Gateway %s/%s is not Programmed: istiod has no address for it", d.Namespace, d.name()),
			Fix: "wait for a detour pod to be Ready (the Gateway's address is its Service, which needs a ready endpoint); check kubectl -n " + d.Namespace + " get pods -l app.kubernetes.io/name=" + d.name()})
	default:
		add(Finding{Check: "gateway", OK: true, Say: "Gateway " + d.Namespace + "/" + d.name() + " is Programmed"})
	}
	if err == nil {
		d.checkScope(gw.Object, add)
	}

	// The waypoint Service has a ready endpoint.
	slices, err := d.Kube.DiscoveryV1().EndpointSlices(d.Namespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + d.name()})
	ready := 0
	if err == nil {
		for _, s := range slices.Items {
			for _, e := range s.Endpoints {
				if e.Conditions.Ready == nil || *e.Conditions.Ready {
					ready++
				}
			}
		}
	}
	if ready > 0 {
		add(Finding{Check: "endpoints", OK: true, Say: fmt.Sprintf("service %s has %d ready endpoint(s)", host, ready)})
	} else {
		add(Finding{Check: "endpoints", Say: "service " + host + " has no ready endpoint: no detour pod is ready",
			Fix: "kubectl -n " + d.Namespace + " describe pods -l app.kubernetes.io/name=" + d.name() + " (readiness: /readyz needs an identity from istiod and synced discovery)"})
	}

	if d.Service != "" {
		d.checkBinding(ctx, ns.Labels, add)
		d.checkUnsupported(ctx, add)
		if d.Developer != "" {
			d.checkGrant(ctx, add)
		}
		if d.Ambientz != "" {
			d.checkAmbientz(ctx, host, add)
		}
	}
	return out, nil
}

// checkScope: the Gateway admits only its own namespace's services, those the installed
// waypoint (discovering its namespace only, as detour install writes it) sees (scope.go).
func (d *Doctor) checkScope(obj map[string]any, add func(Finding)) {
	var gw gwv1.Gateway
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj, &gw); err != nil {
		return // the gateway check reported what is wrong with it
	}
	if what := admitsOthers(&gw, d.Namespace); what != "" {
		add(Finding{Check: "scope", Say: "Gateway " + d.Namespace + "/" + d.name() + ": " + what,
			Fix: "kubectl -n " + d.Namespace + " edit gateway " + d.name() + " (remove the mesh listener's allowedRoutes)"})
	}
}

// checkBinding: the service (or its namespace) uses this waypoint.
func (d *Doctor) checkBinding(ctx context.Context, nsLabels map[string]string, add func(Finding)) {
	svc, err := d.Kube.CoreV1().Services(d.Namespace).Get(ctx, d.Service, metav1.GetOptions{})
	if err != nil {
		add(Finding{Check: "binding", Say: fmt.Sprintf("service %s/%s: %v", d.Namespace, d.Service, err), Fix: "check the service name"})
		return
	}
	use, where := nsLabels[UseWaypoint], "namespace "+d.Namespace
	if v, ok := svc.Labels[UseWaypoint]; ok {
		use, where = v, "service "+d.Service
	}
	switch use {
	case d.name():
		add(Finding{Check: "binding", OK: true, Say: fmt.Sprintf("%s is bound to waypoint %s (%s)", d.Service, use, where)})
	case "":
		add(Finding{Check: "binding", Say: "service " + d.Service + " uses no waypoint",
			Fix: fmt.Sprintf("detour install -n %s --bind svc/%s", d.Namespace, d.Service)})
	default:
		add(Finding{Check: "binding", Say: fmt.Sprintf("service %s is bound to another waypoint, %s (%s)", d.Service, use, where),
			Fix: fmt.Sprintf("detour install -n %s --bind svc/%s --take-over (detour uninstall gives it back)", d.Namespace, d.Service)})
	}
}

// checkUnsupported: no Istio config that detour does not implement applies to the service at
// its waypoint (what the waypoint's detour_unsupported_config gauge would show).
func (d *Doctor) checkUnsupported(ctx context.Context, add func(Finding)) {
	svc := &route.Service{Namespace: d.Namespace, Name: d.Service, Hostname: d.Service + "." + d.Namespace + ".svc.cluster.local"}
	root := d.RootNamespace
	if root == "" {
		root = "istio-system"
	}
	found, err := FindUnsupported(ctx, d.Dynamic, d.Namespace, d.name(), root, []*route.Service{svc})
	switch {
	case err != nil:
		add(Finding{Check: "unsupported", Say: "cannot look for Istio config detour does not implement: " + err.Error(),
			Fix: "grant list on virtualservices, destinationrules, envoyfilters, wasmplugins, trafficextensions, telemetries and the Gateway API routes in " + d.Namespace + " and " + root})
	case len(found) == 0:
		add(Finding{Check: "unsupported", OK: true, Say: "no VirtualService, DestinationRule, EnvoyFilter, WasmPlugin, TrafficExtension, Telemetry beyond the defaults or route detour refuses applies to " + d.Service + " at the waypoint"})
	default:
		add(Finding{Check: "unsupported", Say: fmt.Sprintf("%d Istio object(s) that detour does not implement apply to %s, so traffic through detour differs from Istio's waypoint:%s",
			len(found), d.Service, describeUnsupported(found)),
			Fix: "move their intent to Gateway API routes and AuthorizationPolicies (which detour applies; for a route detour refuses, drop the field it names), or accept the difference (detour install --bind ... --force)"})
	}
}

// checkGrant: an AuthorizationPolicy lets the developer steal from the service.
func (d *Doctor) checkGrant(ctx context.Context, add func(Finding)) {
	list, err := d.Istio.SecurityV1().AuthorizationPolicies(d.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		add(Finding{Check: "policy", Say: "cannot list AuthorizationPolicies: " + err.Error()})
		return
	}
	var ps []*authz.Policy
	for _, ap := range list.Items {
		ps = append(ps, &authz.Policy{Namespace: ap.Namespace, Name: ap.Name, Spec: &ap.Spec, DryRun: authz.DryRun(ap.Annotations)})
	}
	svcHost := d.Service + "." + d.Namespace + ".svc.cluster.local"
	dec := authz.New(authz.Waypoint{Namespace: d.Namespace, Gateway: d.name()}, ps).Grant(&authz.Request{
		Principal: d.Developer, Service: authz.Service{Namespace: d.Namespace, Name: d.Service},
		HTTP: &authz.HTTPRequest{Method: "STEAL", Host: svcHost},
	})
	if dec.Allow {
		add(Finding{Check: "policy", OK: true, Say: fmt.Sprintf("%s may STEAL from %s (%s)", d.Developer, svcHost, dec.Reason)})
		return
	}
	add(Finding{Check: "policy", Say: fmt.Sprintf("%s may not STEAL from %s: %s", d.Developer, svcHost, dec.Reason),
		Fix: fmt.Sprintf("apply an AuthorizationPolicy in %s targeting Gateway %s: ALLOW from principals [%q] to methods [STEAL] hosts [%q]",
			d.Namespace, d.name(), d.Developer, svcHost)})
}

// checkAmbientz: istiod tells ztunnel that the service's waypoint is detour.
func (d *Doctor) checkAmbientz(ctx context.Context, host string, add func(Finding)) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.Ambientz, nil)
	if err != nil {
		add(Finding{Check: "istiod", Say: err.Error()})
		return
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		add(Finding{Check: "istiod", Say: "cannot read istiod's ambient view: " + err.Error(), Fix: "kubectl -n istio-system port-forward deploy/istiod 15014 and pass --istiod http://127.0.0.1:15014/debug/ambientz"})
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	var view struct {
		Services []struct {
			Name, Namespace string
			Waypoint        *struct {
				Hostname *struct{ Hostname string } `json:"hostname"`
			} `json:"waypoint"`
		} `json:"services"`
	}
	if err := json.Unmarshal(body, &view); err != nil {
		add(Finding{Check: "istiod", Say: "istiod's ambient view is not JSON: " + err.Error()})
		return
	}
	for _, s := range view.Services {
		if s.Name != d.Service || s.Namespace != d.Namespace {
			continue
		}
		got := ""
		if s.Waypoint != nil && s.Waypoint.Hostname != nil {
			got = s.Waypoint.Hostname.Hostname
		}
		if got == host {
			add(Finding{Check: "istiod", OK: true, Say: "istiod tells ztunnel that " + d.Service + "'s waypoint is " + host})
		} else {
			add(Finding{Check: "istiod", Say: fmt.Sprintf("istiod tells ztunnel that %s's waypoint is %q, not %s", d.Service, got, host),
				Fix: "fix the findings above (binding, Gateway, endpoints); istiod follows within seconds"})
		}
		return
	}
	add(Finding{Check: "istiod", Say: "istiod's ambient view has no service " + d.Namespace + "/" + d.Service, Fix: "check that istiod watches this namespace"})
}

func gatewayProgrammed(obj map[string]any) bool {
	status, _ := obj["status"].(map[string]any)
	conds, _ := status["conditions"].([]any)
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Programmed" && m["status"] == "True" {
			return true
		}
	}
	return false
}
