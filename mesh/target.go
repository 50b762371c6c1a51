package mesh

import (
	"context"
	"fmt"
	"net"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// ServiceResolver maps cluster service names (NAME, NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local;
// NS defaults to ns) to their cluster IPs.
func ServiceResolver(kube kubernetes.Interface, ns string) func(context.Context, string) (net.IP, error) {
	return func(ctx context.Context, host string) (net.IP, error) {
		name, rest, _ := strings.Cut(strings.TrimSuffix(host, "."), ".")
		sns := ns
		if rest != "" {
			sns, rest, _ = strings.Cut(rest, ".")
			if rest != "" && rest != "svc" && rest != "svc.cluster.local" {
				return nil, fmt.Errorf("mesh: %s is not a cluster service name", host)
			}
		}
		svc, err := kube.CoreV1().Services(sns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("mesh: resolving %s: %w", host, err)
		}
		ip := net.ParseIP(svc.Spec.ClusterIP)
		if ip == nil {
			return nil, fmt.Errorf("mesh: service %s/%s has no cluster IP (headless)", sns, name)
		}
		return ip, nil
	}
}

func readErr(kind, ns, name string, err error) error {
	if ns != "" {
		name = ns + "/" + name
	}
	if apierrors.IsForbidden(err) {
		return fmt.Errorf("mesh: your kubeconfig may not read %s %s, which the target's environment uses (ask for get on it): %w", kind, name, err)
	}
	return fmt.Errorf("mesh: reading %s %s for the target's environment: %w", kind, name, err)
}
