package mesh

import (
	"fmt"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
)

// Clients are the clients of one cluster, all from one rest config: the only way cmd/ reaches
// Kubernetes.
type Clients struct {
	Config  *rest.Config
	Kube    kubernetes.Interface
	Dynamic dynamic.Interface
	Istio   istioclient.Interface
	Gateway gwclient.Interface // HTTPRoutes, GRPCRoutes
}

// NewClients builds every client from rc (no I/O).
func NewClients(rc *rest.Config) (*Clients, error) {
	c := &Clients{Config: rc}
	var err error
	if c.Kube, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("mesh: kubernetes client: %w", err)
	}
	if c.Dynamic, err = dynamic.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("mesh: dynamic client: %w", err)
	}
	if c.Istio, err = istioclient.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("mesh: istio client: %w", err)
	}
	if c.Gateway, err = gwclient.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("mesh: gateway-api client: %w", err)
	}
	return c, nil
}

// UserClients are the clients of the user's kubeconfig: path, else $KUBECONFIG, else
// ~/.kube/config.
func UserClients(path string) (*Clients, error) { return UserClientsContext(path, "") }

// UserClientsContext are UserClients for the kubeconfig context named kubeContext ("": the
// current context).
func UserClientsContext(path, kubeContext string) (*Clients, error) {
	rc, err := userClientConfig(path, kubeContext).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("mesh: kubeconfig: %w", err)
	}
	return NewClients(userRate(rc))
}

// User rates: kubectl's (its discovery client's QPS 50, burst 300), not client-go's default of 5
// requests per second, which made `detour install` wait about 20 s on its own access reviews.
const (
	userQPS   = 50
	userBurst = 300
)

// userRate raises rc's client-side rate limit to the user rates unless the caller set one.
func userRate(rc *rest.Config) *rest.Config {
	if rc.QPS == 0 && rc.RateLimiter == nil {
		rc.QPS = userQPS
	}
	if rc.Burst == 0 && rc.RateLimiter == nil {
		rc.Burst = userBurst
	}
	return rc
}

// UserContext says which context and namespace the user's kubeconfig (as UserClientsContext
// reads it) selects, without contacting the cluster: the context's name ("" when there is no
// kubeconfig at all) and its namespace ("default" when it names none).
func UserContext(path, kubeContext string) (name, namespace string, err error) {
	cc := userClientConfig(path, kubeContext)
	raw, err := cc.RawConfig()
	if err != nil {
		return "", "", fmt.Errorf("mesh: kubeconfig: %w", err)
	}
	name = kubeContext
	if name == "" {
		name = raw.CurrentContext
	}
	if _, ok := raw.Contexts[name]; !ok && name != "" {
		return "", "", fmt.Errorf("mesh: kubeconfig: context %q not found", name)
	}
	if namespace, _, err = cc.Namespace(); err != nil {
		return "", "", fmt.Errorf("mesh: kubeconfig: %w", err)
	}
	return name, namespace, nil
}

func userClientConfig(path, kubeContext string) clientcmd.ClientConfig {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	return clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: kubeContext})
}

// WorkloadClients are the waypoint's: the kubeconfig file at path, or the in-cluster config
// (the pod's service account) when path is "".
func WorkloadClients(path string) (*Clients, error) {
	var rc *rest.Config
	var err error
	if path == "" {
		if rc, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("mesh: no kubeconfig given and not in a cluster: %w", err)
		}
	} else if rc, err = clientcmd.BuildConfigFromFlags("", path); err != nil {
		return nil, fmt.Errorf("mesh: kubeconfig %s: %w", path, err)
	}
	return NewClients(rc)
}

// UserConfig is the user's kubeconfig: path, else $KUBECONFIG, else ~/.kube/config (client-go's
// loading rules, which read the environment; the CLI is the only caller).
func UserConfig(path string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("mesh: kubeconfig: %w", err)
	}
	return userRate(rc), nil
}
