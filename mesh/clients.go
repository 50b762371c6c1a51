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
func UserClients(path string) (*Clients, error) {
	rc, err := UserConfig(path)
	if err != nil {
		return nil, err
	}
	return NewClients(rc)
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
	return rc, nil
}
