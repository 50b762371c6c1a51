// Package mesh is detour's Kubernetes side: Discovery watches Namespaces, Services,
// EndpointSlices, Pods and Istio AuthorizationPolicies and RequestAuthentications with client-go
// informers and compiles them into the route table, policy engine and authenticator the waypoint
// reads (proxy/route, proxy/authz, proxy/authn), which never import client-go.
package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/detour-mesh/detour/proxy/authn"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
	"github.com/detour-mesh/detour/proxy/route"
)

// debounce gathers a burst of changes into one rebuild.
const debounce = 20 * time.Millisecond

// Discovery keeps the route table and the policy engine in step with the cluster. Routes and
// Policies are lock-free reads of immutable snapshots: a rebuild never touches a stream already
// routed.
//
// Only services bound to this waypoint are routable: those whose istio.io/use-waypoint label
// (on the Service, else on its Namespace; istio.io/use-waypoint-namespace names the waypoint's
// namespace, default the labelled object's; "none" opts out) names Waypoint's Gateway. The
// others are in the table as route.Service.Unbound. The Service whose hostname is the Gateway's
// address (Address) is the waypoint's own (route.Service.Self): its VIPs and its endpoints, the
// replicas, are refused as destinations.
type Discovery struct {
	Kube  kubernetes.Interface
	Istio istioclient.Interface
	// Gateway reads HTTPRoutes, GRPCRoutes, TCPRoutes and TLSRoutes (gateway.networking.k8s.io/v1;
	// TCPRoutes and TLSRoutes v1alpha2 where v1 is not served); nil watches none.
	Gateway gwclient.Interface
	// Namespace limits the watch to one namespace; "" watches all. The Namespace objects
	// (cluster-scoped: get, list and watch on namespaces) are read either way, for their labels.
	Namespace string
	Waypoint  authz.Waypoint
	// Address is the Gateway's address, the hostname of the waypoint's own Service; "" means
	// GATEWAY.NAMESPACE.svc.cluster.local, what detour install writes in the Gateway's
	// spec.addresses.
	Address string
	Logger  *slog.Logger // nil means slog.Default()
	// MeshConfig, when set, is called from Run with istiod's mesh config (MeshConfigMap in the
	// root namespace; see meshconfig.go) once synced and whenever it changes.
	MeshConfig func(*meshv1alpha1.MeshConfig)
	// UnsupportedConfig, when set, is called from Run after each snapshot with the Istio objects
	// that would apply to bound services and that detour does not implement (see Unsupported).
	UnsupportedConfig func([]Unsupported)

	routes atomic.Pointer[route.Table]
	http   atomic.Pointer[httproute.Table]
	l4     atomic.Pointer[l4route.Table]
	unsup  atomic.Pointer[[]Unsupported]
	// refused are the last snapshot's routes detour does not apply (see refusedRoute).
	refused atomic.Pointer[[]refusedRoute]
	// unsupListers are Run's listers of the kinds reported as Unsupported, for UnsupportedFor.
	unsupListers atomic.Pointer[unsupportedListers]
	engine       atomic.Pointer[authz.Engine]
	authn        atomic.Pointer[authn.Authenticator]
	keys         authn.Keys // jwksUri key sets, kept across snapshots
	ready        atomic.Bool
	builds       atomic.Int64
	changed      chan struct{}

	meshSeen bool              // owned by Run
	meshData string            // owned by Run
	reported map[string]string // owned by Run: the Unsupported objects warned of, and their services
	logged   map[string]string // owned by Run: the refused routes bound to no service warned of, and why
	scoped   map[string]bool   // owned by Run: the routes out of this waypoint's scope logged (logOutOfScope)
}

// Routes is the current route table (an empty one before the first sync).
func (d *Discovery) Routes() *route.Table {
	if t := d.routes.Load(); t != nil {
		return t
	}
	t, _ := route.NewTable(nil)
	return t
}

// HTTPRoutes is the current table of HTTPRoutes and GRPCRoutes attached to services (nil, no
// route, before the first sync).
func (d *Discovery) HTTPRoutes() *httproute.Table { return d.http.Load() }

// L4Routes is the current table of TCPRoutes and TLSRoutes attached to services (nil, no route,
// before the first sync).
func (d *Discovery) L4Routes() *l4route.Table { return d.l4.Load() }

// UnsupportedObjects are the Istio objects of the last snapshot that would apply to bound
// services and that detour does not implement (none before the first sync).
func (d *Discovery) UnsupportedObjects() []Unsupported {
	if u := d.unsup.Load(); u != nil {
		return *u
	}
	return nil
}

// Policies is the current policy engine. Before the first sync it refuses everything: no
// policy seen is not the same as no policy.
func (d *Discovery) Policies() *authz.Engine {
	if e := d.engine.Load(); e != nil {
		return e
	}
	return notSynced
}

// Authn is the current RequestAuthentication authenticator; nil before the first sync (when
// Policies denies everything anyway).
func (d *Discovery) Authn() *authn.Authenticator { return d.authn.Load() }

// notSynced denies every request (one DENY policy matching everything).
var notSynced = authz.DenyAll("detour/discovery-not-synced")

// Ready reports whether every informer synced and the first snapshot is built.
func (d *Discovery) Ready() bool { return d.ready.Load() }

// Builds counts snapshots built (for tests and metrics).
func (d *Discovery) Builds() int64 { return d.builds.Load() }

type listers struct {
	namespace   func(name string) (*corev1.Namespace, error)
	services    func() ([]*corev1.Service, error)
	slices      func() ([]*discoveryv1.EndpointSlice, error)
	pod         func(ns, name string) (*corev1.Pod, error)
	pods        func() ([]*corev1.Pod, error)
	policies    func() ([]*authz.Policy, error)
	authns      func() ([]*authn.Policy, error)
	mesh        func() (*corev1.ConfigMap, error) // nil: not watched
	httpRoutes  func() ([]*gwv1.HTTPRoute, error)
	grpcRoutes  func() ([]*gwv1.GRPCRoute, error)
	tcpRoutes   func() ([]l4Object, error)
	tlsRoutes   func() ([]l4Object, error)
	unsupported unsupportedListers
}

// Run watches until ctx ends.
func (d *Discovery) Run(ctx context.Context) error {
	d.changed = make(chan struct{}, 1)
	var kopts []informers.SharedInformerOption
	var iopts []istioinformers.SharedInformerOption
	if d.Namespace != "" {
		kopts = append(kopts, informers.WithNamespace(d.Namespace))
		iopts = append(iopts, istioinformers.WithNamespace(d.Namespace))
	}
	var nsopts []informers.SharedInformerOption
	if d.Namespace != "" {
		sel := fields.OneTermEqualSelector("metadata.name", d.Namespace).String()
		nsopts = append(nsopts, informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = sel }))
	}
	if err := d.canReadNamespaces(ctx); err != nil {
		return err
	}
	kf := informers.NewSharedInformerFactoryWithOptions(d.Kube, 0, kopts...)
	nf := informers.NewSharedInformerFactoryWithOptions(d.Kube, 0, nsopts...)
	inf := istioinformers.NewSharedInformerFactoryWithOptions(d.Istio, 0, iopts...)
	svc, sl, pods := kf.Core().V1().Services(), kf.Discovery().V1().EndpointSlices(), kf.Core().V1().Pods()
	nss := nf.Core().V1().Namespaces()
	aps := inf.Security().V1().AuthorizationPolicies()
	ras := inf.Security().V1().RequestAuthentications()
	poke := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { d.poke() },
		UpdateFunc: func(any, any) { d.poke() },
		DeleteFunc: func(any) { d.poke() },
	}
	watched := []cache.SharedIndexInformer{nss.Informer(), svc.Informer(), sl.Informer(), pods.Informer(), aps.Informer(), ras.Informer()}
	mf := d.meshConfigFactory(ctx)
	factories := []informers.SharedInformerFactory{kf, nf}
	var meshCM func() (*corev1.ConfigMap, error)
	if mf != nil {
		cms := mf.Core().V1().ConfigMaps()
		watched = append(watched, cms.Informer())
		factories = append(factories, mf)
		meshCM = func() (*corev1.ConfigMap, error) {
			return cms.Lister().ConfigMaps(d.rootNamespace()).Get(MeshConfigMap)
		}
		mf.Start(ctx.Done())
		defer mf.Shutdown()
	}
	for _, i := range watched {
		if _, err := i.AddEventHandler(poke); err != nil {
			return fmt.Errorf("mesh: %w", err)
		}
	}
	ri, err := d.routeInformers(poke)
	if err != nil {
		return err
	}
	gateway := d.gatewayLister(ctx, ri, poke) // before the factory starts
	if ri.factory != nil {
		ri.factory.Start(ctx.Done())
		defer ri.factory.Shutdown()
	}
	ufs, ul := d.unsupportedInformers(ctx, iopts, poke)
	ul.gateway = gateway
	for _, uf := range ufs {
		uf.Start(ctx.Done())
		defer uf.Shutdown()
	}
	kf.Start(ctx.Done())
	nf.Start(ctx.Done())
	inf.Start(ctx.Done())
	defer kf.Shutdown()
	defer nf.Shutdown()
	defer inf.Shutdown()
	for _, f := range factories {
		for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
			if !ok {
				return errors.Join(ctx.Err(), fmt.Errorf("mesh: %v never synced", typ))
			}
		}
	}
	for typ, ok := range inf.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return errors.Join(ctx.Err(), fmt.Errorf("mesh: %v never synced", typ))
		}
	}
	if err := ri.sync(ctx); err != nil {
		return err
	}
	for _, uf := range ufs {
		for typ, ok := range uf.WaitForCacheSync(ctx.Done()) {
			if !ok {
				return errors.Join(ctx.Err(), fmt.Errorf("mesh: %v never synced", typ))
			}
		}
	}
	ul.routes = func() []refusedRoute {
		if r := d.refused.Load(); r != nil {
			return *r
		}
		return nil
	}
	l := listers{
		namespace: func(name string) (*corev1.Namespace, error) { return nss.Lister().Get(name) },
		services:  func() ([]*corev1.Service, error) { return svc.Lister().List(labels.Everything()) },
		slices:    func() ([]*discoveryv1.EndpointSlice, error) { return sl.Lister().List(labels.Everything()) },
		pod:       func(ns, name string) (*corev1.Pod, error) { return pods.Lister().Pods(ns).Get(name) },
		pods:      func() ([]*corev1.Pod, error) { return pods.Lister().List(labels.Everything()) },
		policies: func() ([]*authz.Policy, error) {
			list, err := aps.Lister().List(labels.Everything())
			if err != nil {
				return nil, err
			}
			out := make([]*authz.Policy, 0, len(list))
			for _, ap := range list {
				out = append(out, &authz.Policy{Namespace: ap.Namespace, Name: ap.Name, Spec: &ap.Spec, DryRun: authz.DryRun(ap.Annotations)})
			}
			return out, nil
		},
		authns: func() ([]*authn.Policy, error) {
			list, err := ras.Lister().List(labels.Everything())
			if err != nil {
				return nil, err
			}
			out := make([]*authn.Policy, 0, len(list))
			for _, ra := range list {
				out = append(out, &authn.Policy{Namespace: ra.Namespace, Name: ra.Name, Spec: &ra.Spec})
			}
			return out, nil
		},
		mesh:        meshCM,
		httpRoutes:  ri.http,
		grpcRoutes:  ri.grpc,
		tcpRoutes:   ri.tcp,
		tlsRoutes:   ri.tls,
		unsupported: ul,
	}
	d.unsupListers.Store(&ul)
	d.rebuild(l)
	d.ready.Store(true)
	d.log().Info("mesh: discovery synced", "namespace", d.Namespace)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-d.changed:
		}
		select { // gather the rest of a burst
		case <-ctx.Done():
			return nil
		case <-time.After(debounce):
		}
		select {
		case <-d.changed:
		default:
		}
		d.rebuild(l)
	}
}

// canReadNamespaces fails at once, naming the permission, when the Namespace objects cannot be
// listed: their labels bind services, and an informer would retry forever.
func (d *Discovery) canReadNamespaces(ctx context.Context) error {
	lo := metav1.ListOptions{Limit: 1}
	if d.Namespace != "" {
		lo.FieldSelector = fields.OneTermEqualSelector("metadata.name", d.Namespace).String()
	}
	_, err := d.Kube.CoreV1().Namespaces().List(ctx, lo)
	if apierrors.IsForbidden(err) {
		return fmt.Errorf("mesh: reading namespaces (their istio.io/use-waypoint labels bind services) needs get, list and watch on namespaces: %w", err)
	}
	if err != nil {
		return fmt.Errorf("mesh: listing namespaces: %w", err)
	}
	return nil
}

func (d *Discovery) poke() {
	select {
	case d.changed <- struct{}{}:
	default:
	}
}

// rebuild compiles a new snapshot; on an error the last good one stays.
func (d *Discovery) rebuild(l listers) {
	table, err := d.table(l)
	if err != nil {
		d.log().Error("mesh: routes not updated", "err", err)
	} else {
		d.routes.Store(table)
		if hr, lr, refused, err := d.compileRoutes(l, table); err != nil {
			d.log().Error("mesh: routes not updated", "err", err)
		} else {
			d.http.Store(hr)
			d.l4.Store(lr)
			d.refused.Store(&refused)
		}
		if us, err := d.findUnsupported(l.unsupported, table); err != nil {
			d.log().Error("mesh: unsupported Istio objects not updated", "err", err)
		} else {
			d.reportUnsupported(us)
			if r := d.refused.Load(); r != nil {
				d.logRefused(*r, us)
			}
		}
	}
	ps, err := l.policies()
	if err != nil {
		d.log().Error("mesh: policies not updated", "err", err)
	} else {
		d.engine.Store(authz.New(d.Waypoint, ps))
	}
	if d.keys.Logger == nil {
		d.keys.Logger = d.log()
	}
	if ras, err := l.authns(); err != nil {
		d.log().Error("mesh: request authentications not updated", "err", err)
	} else {
		d.authn.Store(authn.New(d.Waypoint, ras, &d.keys, nil))
	}
	d.updateMeshConfig(l.mesh)
	d.builds.Add(1)
}

func (d *Discovery) table(l listers) (*route.Table, error) {
	svcs, err := l.services()
	if err != nil {
		return nil, err
	}
	all, err := l.slices()
	if err != nil {
		return nil, err
	}
	bySvc := map[[2]string][]*discoveryv1.EndpointSlice{}
	for _, s := range all {
		if name := s.Labels[discoveryv1.LabelServiceName]; name != "" && s.AddressType == discoveryv1.AddressTypeIPv4 {
			k := [2]string{s.Namespace, name}
			bySvc[k] = append(bySvc[k], s)
		}
	}
	var out []*route.Service
	self := d.address()
	for _, s := range svcs {
		rs := d.service(l, s, bySvc[[2]string{s.Namespace, s.Name}])
		var nsLabels map[string]string
		if ns, err := l.namespace(s.Namespace); err == nil {
			nsLabels = ns.Labels
		}
		wns, wname, ok := useWaypoint(s.Labels, s.Namespace, nsLabels)
		rs.Unbound = !ok || wns != d.Waypoint.Namespace || wname != d.Waypoint.Gateway || isWaypoint(s.Labels)
		rs.Self = rs.Hostname == self
		out = append(out, rs)
	}
	return route.NewTable(out, sources(l)...)
}

// sources are the watched pods as telemetry names them (Istio's source_workload, ...): a
// stream's source is found by the connection's address.
func sources(l listers) []*route.Workload {
	if l.pods == nil {
		return nil
	}
	pods, err := l.pods()
	if err != nil {
		return nil
	}
	var out []*route.Workload
	for _, p := range pods {
		var ips []netip.Addr
		for _, ip := range p.Status.PodIPs {
			if a, err := netip.ParseAddr(ip.IP); err == nil {
				ips = append(ips, a)
			}
		}
		if len(ips) > 0 && !p.Spec.HostNetwork {
			out = append(out, podWorkload(p, ips...))
		}
	}
	return out
}

// podWorkload names a pod's workload as Istio does (istio pkg/kube/util.go, GetDeployMetaFromPod):
// a generated pod's controller, a ReplicaSet named for its pod-template-hash being its Deployment,
// a Job named <cronjob>-<8 to 10 digits> its CronJob; otherwise the pod itself.
func podWorkload(p *corev1.Pod, ips ...netip.Addr) *route.Workload {
	name := p.Name
	if p.GenerateName != "" {
		for _, ref := range p.OwnerReferences {
			if ref.Controller == nil || !*ref.Controller {
				continue
			}
			name = ref.Name
			if h := p.Labels["pod-template-hash"]; ref.Kind == "ReplicaSet" && h != "" && strings.HasSuffix(ref.Name, h) {
				name = strings.TrimSuffix(ref.Name, "-"+h)
			} else if ref.Kind == "Job" {
				if m := cronJobName.FindStringSubmatch(ref.Name); m != nil {
					name = m[1]
				}
			}
			break
		}
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return route.NewWorkload(name, p.Namespace, sa, p.Labels, ips...)
}

var cronJobName = regexp.MustCompile(`^(.+)-\d{8,10}$`)

// address is the Gateway's address: the hostname of the waypoint's own Service.
func (d *Discovery) address() string {
	if d.Address != "" {
		return d.Address
	}
	return d.Waypoint.Gateway + "." + d.Waypoint.Namespace + ".svc.cluster.local"
}

// useWaypoint resolves the waypoint an object in namespace ns uses, by Istio's rules
// (pilot/pkg/serviceregistry/ambient/waypoints.go): the object's istio.io/use-waypoint label,
// else its Namespace's; the waypoint's namespace is istio.io/use-waypoint-namespace on the same
// object, else ns; "none" on the object opts out even when its namespace names a waypoint. ok
// is false when no waypoint applies.
func useWaypoint(objLabels map[string]string, ns string, nsLabels map[string]string) (wns, name string, ok bool) {
	for _, labels := range []map[string]string{objLabels, nsLabels} {
		v, set := labels[UseWaypoint]
		if !set {
			continue
		}
		if v == "none" {
			return "", "", false
		}
		wns = ns
		if o, set := labels[UseWaypointNamespace]; set {
			wns = o
		}
		return wns, v, true
	}
	return "", "", false
}

// isWaypoint: Istio's waypoints (and east-west gateways) never have a waypoint themselves.
func isWaypoint(labels map[string]string) bool {
	m := labels["gateway.istio.io/managed"]
	return m == "istio.io-mesh-controller" || m == "istio.io-eastwest-controller"
}

// service converts one Service and its EndpointSlices. Named target ports take the number the
// EndpointSlice gives the port of that name; an endpoint's identity is its Pod's service account
// (none known: the endpoint is kept, and the waypoint refuses to use it).
func (d *Discovery) service(l listers, s *corev1.Service, slices_ []*discoveryv1.EndpointSlice) *route.Service {
	rs := &route.Service{Name: s.Name, Namespace: s.Namespace, Hostname: s.Name + "." + s.Namespace + ".svc.cluster.local"}
	for _, ip := range s.Spec.ClusterIPs {
		if a, err := netip.ParseAddr(ip); err == nil {
			rs.VIPs = append(rs.VIPs, a)
		}
	}
	for _, p := range s.Spec.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue
		}
		rp := route.Port{Name: p.Name, Port: uint16(p.Port), TargetPort: uint16(p.TargetPort.IntVal)}
		if p.AppProtocol != nil {
			rp.AppProtocol = *p.AppProtocol
		}
		if p.TargetPort.StrVal != "" || rp.TargetPort == 0 {
			rp.TargetPort = namedPort(slices_, p.Name)
		}
		if rp.TargetPort == 0 {
			rp.TargetPort = rp.Port
		}
		rs.Ports = append(rs.Ports, rp)
	}
	seen := map[netip.Addr]bool{}
	for _, sl := range slices_ {
		for _, ep := range sl.Endpoints {
			if len(ep.Addresses) == 0 {
				continue
			}
			ip, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || seen[ip] {
				continue
			}
			seen[ip] = true
			e := route.Endpoint{IP: ip, Ready: ep.Conditions.Ready == nil || *ep.Conditions.Ready, Namespace: s.Namespace}
			if ref := ep.TargetRef; ref != nil && ref.Kind == "Pod" {
				ns := ref.Namespace
				if ns == "" {
					ns = sl.Namespace
				}
				if pod, err := l.pod(ns, ref.Name); err == nil {
					e.ServiceAccount, e.Namespace = pod.Spec.ServiceAccountName, ns
					if e.ServiceAccount == "" {
						e.ServiceAccount = "default"
					}
					e.Workload = podWorkload(pod, ip)
				}
			}
			rs.Endpoints = append(rs.Endpoints, e)
		}
	}
	slices.SortFunc(rs.Endpoints, func(a, b route.Endpoint) int { return a.IP.Compare(b.IP) })
	return rs
}

func namedPort(sls []*discoveryv1.EndpointSlice, name string) uint16 {
	for _, sl := range sls {
		for _, p := range sl.Ports {
			if p.Name != nil && *p.Name == name && p.Port != nil {
				return uint16(*p.Port)
			}
		}
	}
	return 0
}

func (d *Discovery) log() *slog.Logger {
	if d.Logger != nil {
		return d.Logger
	}
	return slog.Default()
}
