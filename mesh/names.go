package mesh

import (
	"context"
	"fmt"
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// maxNames bounds a completion's listing.
const maxNames = 500

// NamespaceNames lists the cluster's namespaces, sorted (for shell completion).
func NamespaceNames(ctx context.Context, kube kubernetes.Interface) ([]string, error) {
	list, err := kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{Limit: maxNames})
	if err != nil {
		return nil, fmt.Errorf("mesh: listing namespaces: %w", err)
	}
	names := make([]string, 0, len(list.Items))
	for _, n := range list.Items {
		names = append(names, n.Name)
	}
	slices.Sort(names)
	return names, nil
}

// ServiceNames lists namespace's services, sorted (for shell completion).
func ServiceNames(ctx context.Context, kube kubernetes.Interface, namespace string) ([]string, error) {
	list, err := kube.CoreV1().Services(namespace).List(ctx, metav1.ListOptions{Limit: maxNames})
	if err != nil {
		return nil, fmt.Errorf("mesh: listing the services of %s: %w", namespace, err)
	}
	names := make([]string, 0, len(list.Items))
	for _, s := range list.Items {
		names = append(names, s.Name)
	}
	slices.Sort(names)
	return names, nil
}
