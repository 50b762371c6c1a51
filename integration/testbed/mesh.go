package testbed

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
)

// Namespace creates ns (if missing) with labels.
func (c *Cluster) Namespace(ctx context.Context, ns string, labels map[string]string) error {
	_, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: labels}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("testbed: creating namespace %s: %w", ns, err)
	}
	return nil
}

// ServiceAccountToken creates the service account ns/sa if missing and returns a token for it
// with the given audience (TokenRequest), valid for ten minutes.
func (c *Cluster) ServiceAccountToken(ctx context.Context, ns, sa, audience string) (string, error) {
	_, err := c.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("testbed: creating service account %s/%s: %w", ns, sa, err)
	}
	exp := int64(600)
	tr, err := c.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authv1.TokenRequest{
		Spec: authv1.TokenRequestSpec{Audiences: []string{audience}, ExpirationSeconds: &exp},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("testbed: TokenRequest for %s/%s: %w", ns, sa, err)
	}
	return tr.Status.Token, nil
}

// ServicePort is one port of a Service and of its endpoints.
type ServicePort struct {
	Name       string
	Port       int32
	TargetPort int32
}

// Service creates (or replaces the labels of) a ClusterIP Service and an EndpointSlice whose
// endpoints are ready at ips: there is no endpoint controller, so the test plays it.
func (c *Cluster) Service(ctx context.Context, ns, name string, labels map[string]string, ports []ServicePort, ips ...string) (*corev1.Service, error) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels}}
	for _, p := range ports {
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{Name: p.Name, Port: p.Port, TargetPort: intstr.FromInt32(p.TargetPort), Protocol: corev1.ProtocolTCP})
	}
	created, err := c.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("testbed: creating service %s/%s: %w", ns, name, err)
	}
	ready := true
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-testbed", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "detour-testbed"}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, ip := range ips {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}})
	}
	for _, p := range ports {
		slice.Ports = append(slice.Ports, discoveryv1.EndpointPort{Name: &p.Name, Port: &p.TargetPort, Protocol: ptr(corev1.ProtocolTCP)})
	}
	if _, err := c.Client.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("testbed: creating endpoints of %s/%s: %w", ns, name, err)
	}
	return created, nil
}

func ptr[T any](v T) *T { return &v }

// Waypoint creates a Gateway of class istio-waypoint whose address is the hostname of a Service
// the caller runs (spec.addresses Hostname), with the HBONE listener on 15008, as detour registers
// itself. forType is the istio.io/waypoint-for label (service, workload, all, none).
func (c *Cluster) Waypoint(ctx context.Context, ns, name, hostname, forType string) error {
	gc, err := gwclient.NewForConfig(c.REST)
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	hostType := gwv1.HostnameAddressType
	gw := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"istio.io/waypoint-for": forType}},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: "istio-waypoint",
			Addresses:        []gwv1.GatewaySpecAddress{{Type: &hostType, Value: hostname}},
			Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		},
	}
	if _, err := gc.GatewayV1().Gateways(ns).Create(ctx, gw, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("testbed: creating Gateway %s/%s: %w", ns, name, err)
	}
	return nil
}

// AmbientView is the part of istiod's /debug/ambientz that tests read: what ztunnel receives.
type AmbientView struct {
	Services []AmbientService `json:"services"`
}

// AmbientService is a service as ztunnel sees it.
type AmbientService struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	Hostname  string `json:"hostname"`
	Waypoint  *struct {
		Hostname *struct {
			Namespace string `json:"namespace"`
			Hostname  string `json:"hostname"`
		} `json:"hostname"`
		HboneMtlsPort int `json:"hboneMtlsPort"`
	} `json:"waypoint"`
}

// WaypointHost is the hostname of the service's waypoint, or "" when it has none.
func (s AmbientService) WaypointHost() string {
	if s.Waypoint == nil || s.Waypoint.Hostname == nil {
		return ""
	}
	return s.Waypoint.Hostname.Hostname
}

// Ambient reads istiod's ambient view (/debug/ambientz).
func (c *Cluster) Ambient(ctx context.Context) (*AmbientView, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.Istiod.HTTPAddr+"/debug/ambientz", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("testbed: reading /debug/ambientz: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("testbed: /debug/ambientz: %s %v", resp.Status, err)
	}
	var v AmbientView
	if err := json.Unmarshal(body, &v); err != nil {
		return nil, fmt.Errorf("testbed: decoding /debug/ambientz: %w", err)
	}
	return &v, nil
}

// WaitAmbient polls the ambient view until ok accepts the named service (nil when absent), or
// the timeout passes.
func (c *Cluster) WaitAmbient(ctx context.Context, ns, name string, timeout time.Duration, ok func(*AmbientService) bool) error {
	deadline := time.Now().Add(timeout)
	var last *AmbientService
	for {
		v, err := c.Ambient(ctx)
		if err != nil {
			return err
		}
		last = nil
		for i := range v.Services {
			if v.Services[i].Namespace == ns && v.Services[i].Name == name {
				last = &v.Services[i]
			}
		}
		if ok(last) {
			return nil
		}
		if time.Now().After(deadline) {
			b, _ := json.Marshal(last)
			return fmt.Errorf("testbed: %s/%s in the ambient view never became as expected; last: %s", ns, name, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
