package testbed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/yaml"

	"istio.io/istio/cni/pkg/config"
	"istio.io/istio/cni/pkg/ipset"
	"istio.io/istio/cni/pkg/iptables"
	"istio.io/istio/cni/pkg/util"
)

// Istio CNI's names for what its plugin and node agent share (cni/pkg/constants/constants.go):
// the agent's event socket and the path the plugin posts to, the plugin's kubeconfig.
const (
	cniEventSocket     = "pluginevent.sock"
	cniAddEventPath    = "/cmdadd"
	cniPluginKubeconf  = "istio-cni-kubeconfig"
	ambientRunDirTmpl  = "/tmp/dtamb-" // + the node's id: short, for the socket's path
	cniExcludeNS       = "kube-system"
	cniAgentNamespace  = "istio-system"
	hostProbeSetFamily = unix.IPPROTO_TCP
)

// enablementSelectors are Istio CNI's default ambient enablement selectors, as the istio-cni
// chart ships them (manifests/charts/istio-cni/values.yaml ambient.enablementSelectors) and
// install-cni writes them into the plugin's configuration (cni/pkg/install/cniconfig.go): a pod
// labelled istio.io/dataplane-mode=ambient, or any pod not labelled none in a namespace
// labelled ambient.
const enablementSelectors = `
- podSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
- podSelector:
    matchExpressions:
    - { key: istio.io/dataplane-mode, operator: NotIn, values: [none] }
  namespaceSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
`

// cniAddEvent is what Istio's plugin posts to the node agent (cni/pkg/nodeagent/cni-watcher.go
// CNIPluginAddEvent, marshalled by cni/pkg/plugin/cnieventclient.go PushCNIEvent). The package
// itself is not imported: it pulls in Istio's whole kube client.
type cniAddEvent struct {
	Netns        string
	PodName      string
	PodNamespace string
	IPs          []struct {
		Interface *int
		Address   net.IPNet
		Gateway   net.IP
	}
}

// istioCNIConfig is the plugin's entry in the node's conflist, with the fields install-cni
// writes (cni/pkg/install/cniconfig.go createCNIConfigFile over cni/pkg/plugin Config).
func istioCNIConfig(runDir string) (map[string]any, error) {
	var sel []util.EnablementSelector
	if err := yaml.Unmarshal([]byte(enablementSelectors), &sel); err != nil {
		return nil, fmt.Errorf("testbed: Istio CNI's enablement selectors: %w", err)
	}
	return map[string]any{
		"type": "istio-cni", "name": "istio-cni",
		"plugin_log_level":     "info",
		"cni_agent_run_dir":    runDir,
		"ambient_enabled":      true,
		"enablement_selectors": sel,
		"exclude_namespaces":   []string{cniExcludeNS, cniAgentNamespace},
		"pod_namespace":        cniAgentNamespace,
	}, nil
}

// ambientAgent stands in for Istio CNI's node agent on the node, in the test process. Istio's
// own plugin (cni/cmd/istio-cni, last in the node's conflist) decides at each CNI ADD whether
// the pod is ambient (its enablement selectors) and, if so, posts the pod's netns and addresses
// to the agent's socket and fails the ADD unless the agent answers 200, as in any ambient
// cluster. The agent then does what cni/pkg/nodeagent/meshdataplane_linux.go AddPodToMesh does:
// the in-pod rules (Istio's rule builder), the pod's ztunnel (here the in-pod stand-in, routing
// from one WatchWorkloads view shared by the node's pods, with the pod's istiod-issued
// identity), the pod's IP in the host probe ipset, the enrolled annotation. At start it writes
// Istio CNI's host rules (CreateHostRulesForHealthChecks: kubelet probes SNATed to
// 169.254.7.127, which the in-pod rules let through); a deleted pod's stand-in is stopped
// (cni/pkg/nodeagent/informers.go). Fields are immutable after startAmbient unless noted.
type ambientAgent struct {
	c      *Cluster
	node   *Node
	runDir string
	host   *iptables.IptablesConfigurator
	set    ipset.IPSet
	view   *WorkloadView
	srv    *http.Server
	inf    informers.SharedInformerFactory
	ctx    context.Context // cancelled by Close: the view, the informer, pending adds
	cancel context.CancelFunc
	served chan struct{} // closed when the event server returns
	once   sync.Once
	err    error // Close's

	mu   sync.Mutex
	pods map[types.UID]*ambientPod // owned by mu
	ids  map[string]*Workload      // by NS/SA, owned by mu
	errs []string                  // failed adds, owned by mu
}

// ambientPod is one enrolled pod.
type ambientPod struct {
	pod *Pod
	z   *inPodZtunnel
}

// startAmbient starts the node's agent; its Close undoes it, also after an error.
func startAmbient(ctx context.Context, c *Cluster, n *Node) (a *ambientAgent, err error) {
	if c.Istiod == nil {
		return nil, errors.New("testbed: NodeOptions.Ambient needs Options.Istiod")
	}
	a = &ambientAgent{c: c, node: n, runDir: n.ambientDir, pods: map[types.UID]*ambientPod{}, ids: map[string]*Workload{}, served: make(chan struct{})}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			err = errors.Join(err, a.Close())
		}
	}()
	if err := os.MkdirAll(a.runDir, 0o700); err != nil {
		return a, fmt.Errorf("testbed: %w", err)
	}
	kc, err := os.ReadFile(c.Kubeconfig)
	if err != nil {
		return a, fmt.Errorf("testbed: %w", err)
	}
	// install-cni writes the plugin a kubeconfig of the istio-cni service account; here the admin's.
	if err := writeFile(filepath.Join(a.runDir, cniPluginKubeconf), string(kc)); err != nil {
		return a, err
	}
	if err := a.hostRules(); err != nil {
		return a, err
	}
	if a.view, err = c.WatchWorkloads(a.ctx); err != nil {
		return a, err
	}
	a.watchDeletes()
	return a, a.serve()
}

// hostRules writes Istio CNI's host-side rules and creates its probe ipset, unless another
// ambient node on this machine already has (they are the machine's, like kube-proxy's tables).
func (a *ambientAgent) hostRules() error {
	cniScope()
	host, _, err := ruleBuilders()
	if err != nil {
		return err
	}
	a.host = host
	if a.set, err = ipset.NewIPSet(config.ProbeIPSet, false, ipset.RealNlDeps()); err != nil {
		return fmt.Errorf("testbed: Istio CNI's probe ipset: %w", err)
	}
	if othersAlive(a.node.recordPath(), ambientRecord) {
		return nil
	}
	host.DeleteHostRules() // a crashed run's, as initMeshDataplane does first
	if err := host.CreateHostRulesForHealthChecks(); err != nil {
		return fmt.Errorf("testbed: Istio CNI's host rules: %w", err)
	}
	return nil
}

// serve listens on the event socket and serves the plugin's ADD events until Close.
func (a *ambientAgent) serve() error {
	sock := filepath.Join(a.runDir, cniEventSocket)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("testbed: the CNI agent's socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cniAddEventPath, a.handleAdd)
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(a.served)
		a.srv.Serve(l)
	}()
	return nil
}

// handleAdd is cni-watcher.go handleAddEvent: 200 once the pod is in the mesh, 500 with the
// reason otherwise (the plugin then fails the ADD: fail closed).
func (a *ambientAgent) handleAdd(w http.ResponseWriter, r *http.Request) {
	var ev cniAddEvent
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&ev); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if err := a.add(r.Context(), ev); err != nil {
		a.mu.Lock()
		if len(a.errs) < 20 {
			a.errs = append(a.errs, err.Error())
		}
		a.mu.Unlock()
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// add is AddPodToMesh for one ADD: rules, ztunnel, probe ipset, annotation, in that order.
func (a *ambientAgent) add(ctx context.Context, ev cniAddEvent) (err error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pod, err := a.c.Client.CoreV1().Pods(ev.PodNamespace).Get(ctx, ev.PodName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("testbed: CNI agent: reading pod %s/%s: %w", ev.PodNamespace, ev.PodName, err)
	}
	var ip netip.Addr
	for _, c := range ev.IPs {
		if a, ok := netip.AddrFromSlice(c.Address.IP); ok && a.Unmap().Is4() {
			ip = a.Unmap()
			break
		}
	}
	if !ip.IsValid() {
		return fmt.Errorf("testbed: CNI agent: pod %s/%s: no IPv4 address in the ADD", pod.Namespace, pod.Name)
	}
	p := PodAt(ev.Netns, pod.Namespace, pod.Name, pod.Spec.ServiceAccountName, ip.String())
	if err := p.redirect(); err != nil {
		return err
	}
	id, err := a.identity(ctx, p.Namespace, p.ServiceAccount)
	if err != nil {
		return fmt.Errorf("testbed: CNI agent: identity of pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	z, err := startZtunnel(p, id, a.view)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			z.Close()
		}
	}()
	if err := a.set.AddIP(ip, hostProbeSetFamily, string(pod.UID), true); err != nil {
		return fmt.Errorf("testbed: CNI agent: adding %s to the probe ipset: %w", ip, err)
	}
	if err := annotateEnrolled(ctx, a.c, p.Namespace, p.Name); err != nil {
		return err
	}
	return a.register(pod.UID, &ambientPod{pod: p, z: z})
}

// register records an enrolled pod, replacing (and stopping) a previous sandbox's stand-in.
func (a *ambientAgent) register(uid types.UID, ap *ambientPod) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ctx.Err() != nil {
		ap.z.Close()
		return errors.New("testbed: CNI agent: closing")
	}
	if old := a.pods[uid]; old != nil {
		old.z.Close()
	}
	a.pods[uid] = ap
	return nil
}

// identity is the pod service account's certificate from istiod's CA, one per account (ztunnel
// shares one per identity among a node's pods).
func (a *ambientAgent) identity(ctx context.Context, ns, sa string) (*Workload, error) {
	key := ns + "/" + sa
	a.mu.Lock()
	id := a.ids[key]
	a.mu.Unlock()
	if id != nil {
		return id, nil
	}
	id, err := a.c.Workload(ctx, ns, sa)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.ids[key] = id
	a.mu.Unlock()
	return id, nil
}

// watchDeletes stops a pod's stand-in and takes its address out of the probe ipset when the
// pod is deleted or terminal (informers.go: RemovePodFromMesh; the rules go with the netns).
func (a *ambientAgent) watchDeletes() {
	a.inf = informers.NewSharedInformerFactoryWithOptions(a.c.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "spec.nodeName=" + a.node.Name
	}))
	pods := a.inf.Core().V1().Pods().Informer()
	pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(_, obj any) {
			if p, ok := obj.(*corev1.Pod); ok && (p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed) {
				a.remove(p.UID)
			}
		},
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok {
				a.remove(p.UID)
			}
		},
	})
	a.inf.Start(a.ctx.Done())
}

func (a *ambientAgent) remove(uid types.UID) {
	a.mu.Lock()
	ap := a.pods[uid]
	delete(a.pods, uid)
	a.mu.Unlock()
	if ap == nil {
		return
	}
	ap.z.Close()
	a.set.ClearEntriesWithIPAndComment(netip.MustParseAddr(ap.pod.IP), string(uid))
}

// Pods are the enrolled pods, by namespace and name.
func (a *ambientAgent) Pods() []*Pod {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []*Pod
	for _, ap := range a.pods {
		out = append(out, ap.pod)
	}
	slices.SortFunc(out, func(x, y *Pod) int {
		return strings.Compare(x.Namespace+"/"+x.Name, y.Namespace+"/"+y.Name)
	})
	return out
}

// failures are the failed adds and each stand-in's connection failures, for a failing test.
func (a *ambientAgent) failures() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := slices.Clone(a.errs)
	for _, ap := range a.pods {
		for _, e := range ap.z.failures() {
			out = append(out, fmt.Sprintf("ztunnel stand-in in pod %s/%s: %s", ap.pod.Namespace, ap.pod.Name, e))
		}
	}
	return out
}

// Close stops the event server (waiting for pending adds), the informer, the view and every
// stand-in, takes the node's addresses out of the probe ipset, and removes the host rules and
// the ipset when no other ambient node runs here, then the run directory. Idempotent.
func (a *ambientAgent) Close() error {
	a.once.Do(func() { a.err = a.close() })
	return a.err
}

func (a *ambientAgent) close() error {
	var errs []error
	if a.srv != nil {
		// Shutdown waits for pending adds; an add blocked on the API server gives up with a.ctx.
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		if err := a.srv.Shutdown(ctx); err != nil {
			a.srv.Close()
		}
		cancel()
		<-a.served
	}
	a.cancel()
	if a.inf != nil {
		a.inf.Shutdown()
	}
	if a.view != nil {
		<-a.view.done
	}
	a.mu.Lock()
	pods := a.pods
	a.pods = map[types.UID]*ambientPod{}
	a.mu.Unlock()
	for _, ap := range pods {
		ap.z.Close()
	}
	if a.host != nil {
		errs = append(errs, removeAmbientHost(a.set, a.host, a.node.Subnet, !othersAlive(a.node.recordPath(), ambientRecord)))
	}
	if err := os.RemoveAll(a.runDir); err != nil {
		errs = append(errs, fmt.Errorf("testbed: %w", err))
	}
	return errors.Join(errs...)
}

// removeAmbientHost takes the addresses of subnet out of Istio CNI's probe ipset and, when last,
// removes its host rules (DeleteHostRules) and destroys the ipset.
func removeAmbientHost(set ipset.IPSet, host *iptables.IptablesConfigurator, subnet string, last bool) error {
	if last {
		host.DeleteHostRules()
		// The kernel lets go of the set a moment after the rule that matched it is deleted
		// (nf_tables' compat matches are released asynchronously): busy until then.
		var err error
		for range 40 {
			if err = set.DestroySet(); err == nil {
				return nil
			}
			time.Sleep(250 * time.Millisecond)
		}
		return fmt.Errorf("testbed: destroying Istio CNI's probe ipset: %w", err)
	}
	pfx, err := netip.ParsePrefix(subnet)
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	ips, err := set.ListEntriesByIP()
	if err != nil {
		return fmt.Errorf("testbed: listing Istio CNI's probe ipset: %w", err)
	}
	var errs []error
	for _, ip := range ips {
		if pfx.Contains(ip) {
			errs = append(errs, set.ClearEntriesWithIP(ip))
		}
	}
	return errors.Join(errs...)
}

// sweepAmbientHost is removeAmbientHost for a killed run's node.
func sweepAmbientHost(subnet string, last bool) error {
	cniScope()
	host, _, err := ruleBuilders()
	if err != nil {
		return err
	}
	set, err := ipset.NewIPSet(config.ProbeIPSet, false, ipset.RealNlDeps())
	if err != nil {
		return fmt.Errorf("testbed: Istio CNI's probe ipset: %w", err)
	}
	return removeAmbientHost(set, host, subnet, last)
}

// AmbientPods are the pods the node's CNI enrolled in ambient (NodeOptions.Ambient), each served
// by its in-pod ztunnel stand-in, by namespace and name; nil without Ambient.
func (n *Node) AmbientPods() []*Pod {
	if n.ambient == nil {
		return nil
	}
	return n.ambient.Pods()
}

// logAmbient logs what the ambient agent recorded as failed, for a failing test.
func (n *Node) logAmbient(logf func(string, ...any)) {
	if n.ambient == nil {
		return
	}
	for _, e := range n.ambient.failures() {
		logf("testbed: CNI agent: %s", e)
	}
	if b, err := os.ReadFile(filepath.Join(n.ambientDir, "istio-cni.log")); err == nil {
		logf("--- istio-cni plugin log (tail) ---\n%s", tail(string(b)))
	}
}
