package l4route

import (
	"encoding/json"
	"fmt"
	"reflect"

	"go.yaml.in/yaml/v3"

	"github.com/detour-mesh/detour/proxy/httproute"
)

// The types below are the Gateway API's TCPRoute and TLSRoute (gateway.networking.k8s.io v1,
// the version istiod reads, and v1alpha2, which has the same fields; sigs.k8s.io/gateway-api
// apis/v1 tcproute_types.go, tlsroute_types.go) as JSON, with only the fields detour
// implements: a document that sets any other field is refused, never silently applied without
// it. Metadata, parents and backend references are proxy/httproute's (the same Gateway API
// types).

// TCPRoute is a gateway.networking.k8s.io TCPRoute.
type TCPRoute struct {
	APIVersion string             `json:"apiVersion,omitempty"`
	Kind       string             `json:"kind,omitempty"`
	Metadata   httproute.Metadata `json:"metadata"`
	Spec       TCPRouteSpec       `json:"spec"`
	Status     json.RawMessage    `json:"status,omitempty"` // ignored
}

// TCPRouteSpec: the parents and the one rule (v1 allows exactly one; detour refuses more).
type TCPRouteSpec struct {
	ParentRefs []httproute.ParentRef `json:"parentRefs,omitempty"`
	Rules      []RouteRule           `json:"rules,omitempty"`
}

// TLSRoute is a gateway.networking.k8s.io TLSRoute.
type TLSRoute struct {
	APIVersion string             `json:"apiVersion,omitempty"`
	Kind       string             `json:"kind,omitempty"`
	Metadata   httproute.Metadata `json:"metadata"`
	Spec       TLSRouteSpec       `json:"spec"`
	Status     json.RawMessage    `json:"status,omitempty"` // ignored
}

// TLSRouteSpec: the parents, the SNI hostnames the route takes (exact, or a wildcard first
// label `*.example.com`; none: every TLS stream) and the one rule.
type TLSRouteSpec struct {
	ParentRefs []httproute.ParentRef `json:"parentRefs,omitempty"`
	Hostnames  []string              `json:"hostnames,omitempty"`
	Rules      []RouteRule           `json:"rules,omitempty"`
}

// RouteRule is a TCPRoute or TLSRoute rule: its weighted backends.
type RouteRule struct {
	Name        *string      `json:"name,omitempty"`
	BackendRefs []BackendRef `json:"backendRefs,omitempty"`
}

// BackendRef is a weighted backend (default weight 1): a Service and its port.
type BackendRef struct {
	httproute.BackendObjectRef `json:",inline"`
	Weight                     *int32 `json:"weight,omitempty"`
}

// DecodeTCPRoute decodes one TCPRoute (YAML or JSON) strictly: an unknown or unsupported field
// is an error.
func DecodeTCPRoute(doc []byte) (*TCPRoute, error) {
	var r TCPRoute
	if err := httproute.DecodeStrict(doc, &r); err != nil {
		return nil, fmt.Errorf("l4route: TCPRoute: %w", err)
	}
	return &r, nil
}

// DecodeTLSRoute decodes one TLSRoute as DecodeTCPRoute does.
func DecodeTLSRoute(doc []byte) (*TLSRoute, error) {
	var r TLSRoute
	if err := httproute.DecodeStrict(doc, &r); err != nil {
		return nil, fmt.Errorf("l4route: TLSRoute: %w", err)
	}
	return &r, nil
}

// CheckYAML refuses a field of n (one TCPRoute, or TLSRoute when tls, as YAML) that the route
// types do not have, naming it and its YAML line (the strict decoding that follows cannot say
// where it was). path names n in the error.
func CheckYAML(n *yaml.Node, tls bool, path string) error {
	var t reflect.Type = reflect.TypeFor[TCPRoute]()
	if tls {
		t = reflect.TypeFor[TLSRoute]()
	}
	return httproute.CheckFields(n, t, path)
}
