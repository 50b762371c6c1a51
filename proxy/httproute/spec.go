package httproute

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"sigs.k8s.io/yaml"
)

// The types below are the Gateway API's HTTPRoute and GRPCRoute (gateway.networking.k8s.io/v1,
// sigs.k8s.io/gateway-api apis/v1 httproute_types.go, grpcroute_types.go) as JSON, with only
// the fields detour implements: a document that sets any other field is refused by
// DecodeHTTPRoute/DecodeGRPCRoute, never silently applied without it. proxy/ cannot import the
// gateway-api module (it pulls in apimachinery); mesh converts its objects into these.

// Metadata is the part of an object's metadata routing reads.
type Metadata struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	// CreationTimestamp orders routes on a precedence tie (the oldest first); zero sorts first.
	CreationTimestamp time.Time `json:"creationTimestamp,omitzero"`
	// Labels and Annotations are allowed (a manifest copied from a cluster has them) and unused.
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// HTTPRoute is a gateway.networking.k8s.io HTTPRoute.
type HTTPRoute struct {
	APIVersion string          `json:"apiVersion,omitempty"`
	Kind       string          `json:"kind,omitempty"`
	Metadata   Metadata        `json:"metadata"`
	Spec       HTTPRouteSpec   `json:"spec"`
	Status     json.RawMessage `json:"status,omitempty"` // ignored
}

// HTTPRouteSpec: parents, hostnames (not used for Service parents, as in Istio's mesh routes)
// and rules.
type HTTPRouteSpec struct {
	ParentRefs []ParentRef `json:"parentRefs,omitempty"`
	Hostnames  []string    `json:"hostnames,omitempty"`
	Rules      []HTTPRule  `json:"rules,omitempty"`
}

// ParentRef names the Service (group "" or "core", kind Service) a route attaches to; Port
// limits it to one service port. Other parents (Gateways) are not this waypoint's and skipped.
type ParentRef struct {
	Group       *string `json:"group,omitempty"`
	Kind        *string `json:"kind,omitempty"`
	Namespace   *string `json:"namespace,omitempty"`
	Name        string  `json:"name"`
	SectionName *string `json:"sectionName,omitempty"`
	Port        *int32  `json:"port,omitempty"`
}

// HTTPRule is one rule: its matches (ORed), filters, backends, timeouts and retry.
type HTTPRule struct {
	Name        *string      `json:"name,omitempty"`
	Matches     []HTTPMatch  `json:"matches,omitempty"`
	Filters     []Filter     `json:"filters,omitempty"`
	BackendRefs []BackendRef `json:"backendRefs,omitempty"`
	Timeouts    *Timeouts    `json:"timeouts,omitempty"`
	Retry       *Retry       `json:"retry,omitempty"`
}

// HTTPMatch: every condition set must hold.
type HTTPMatch struct {
	Path        *PathMatch   `json:"path,omitempty"`
	Headers     []ValueMatch `json:"headers,omitempty"`
	QueryParams []ValueMatch `json:"queryParams,omitempty"`
	Method      *string      `json:"method,omitempty"`
}

// PathMatch: Type Exact, PathPrefix (the default) or RegularExpression; Value default "/".
type PathMatch struct {
	Type  *string `json:"type,omitempty"`
	Value *string `json:"value,omitempty"`
}

// ValueMatch is a header or query parameter match: Type Exact (the default) or
// RegularExpression.
type ValueMatch struct {
	Type  *string `json:"type,omitempty"`
	Name  string  `json:"name"`
	Value string  `json:"value"`
}

// Filter is one of the filter types below, named by Type.
type Filter struct {
	Type                   string          `json:"type"`
	RequestHeaderModifier  *HeaderModifier `json:"requestHeaderModifier,omitempty"`
	ResponseHeaderModifier *HeaderModifier `json:"responseHeaderModifier,omitempty"`
	RequestMirror          *Mirror         `json:"requestMirror,omitempty"`
	RequestRedirect        *Redirect       `json:"requestRedirect,omitempty"`
	URLRewrite             *URLRewrite     `json:"urlRewrite,omitempty"`
	CORS                   *CORS           `json:"cors,omitempty"`
}

// CORS is the Gateway API's HTTPCORSFilter (HTTPRoute only).
type CORS struct {
	AllowOrigins     []string `json:"allowOrigins,omitempty"` // scheme://host[:port]; "*" any; a host "*.x" any subdomain
	AllowCredentials *bool    `json:"allowCredentials,omitempty"`
	AllowMethods     []string `json:"allowMethods,omitempty"` // "*": any
	AllowHeaders     []string `json:"allowHeaders,omitempty"` // "*": any
	ExposeHeaders    []string `json:"exposeHeaders,omitempty"`
	MaxAge           *int32   `json:"maxAge,omitempty"` // seconds; default 5 (the spec's)
}

// HeaderModifier sets, adds and removes headers (in that order, as Envoy applies them).
type HeaderModifier struct {
	Set    []Header `json:"set,omitempty"`
	Add    []Header `json:"add,omitempty"`
	Remove []string `json:"remove,omitempty"`
}

// Header is a name and a value.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Mirror copies requests to another Service, Percent (or Fraction) of them, default all.
type Mirror struct {
	BackendRef BackendObjectRef `json:"backendRef"`
	Percent    *int32           `json:"percent,omitempty"`
	Fraction   *Fraction        `json:"fraction,omitempty"`
}

// Fraction is Numerator/Denominator (default 100).
type Fraction struct {
	Numerator   int32  `json:"numerator"`
	Denominator *int32 `json:"denominator,omitempty"`
}

// Redirect answers with a redirect instead of forwarding.
type Redirect struct {
	Scheme     *string       `json:"scheme,omitempty"`
	Hostname   *string       `json:"hostname,omitempty"`
	Path       *PathModifier `json:"path,omitempty"`
	Port       *int32        `json:"port,omitempty"`
	StatusCode *int          `json:"statusCode,omitempty"`
}

// URLRewrite changes the host and path before forwarding.
type URLRewrite struct {
	Hostname *string       `json:"hostname,omitempty"`
	Path     *PathModifier `json:"path,omitempty"`
}

// PathModifier: Type ReplaceFullPath or ReplacePrefixMatch, with the matching field.
type PathModifier struct {
	Type               string  `json:"type"`
	ReplaceFullPath    *string `json:"replaceFullPath,omitempty"`
	ReplacePrefixMatch *string `json:"replacePrefixMatch,omitempty"`
}

// BackendObjectRef names a Service (group "" or "core", kind Service) and its port.
type BackendObjectRef struct {
	Group     *string `json:"group,omitempty"`
	Kind      *string `json:"kind,omitempty"`
	Name      string  `json:"name"`
	Namespace *string `json:"namespace,omitempty"`
	Port      *int32  `json:"port,omitempty"`
}

// BackendRef is a weighted backend (default weight 1) with its own filters.
type BackendRef struct {
	BackendObjectRef `json:",inline"`
	Weight           *int32   `json:"weight,omitempty"`
	Filters          []Filter `json:"filters,omitempty"`
}

// Timeouts: Request bounds the whole request, BackendRequest one try (Gateway API durations).
type Timeouts struct {
	Request        *string `json:"request,omitempty"`
	BackendRequest *string `json:"backendRequest,omitempty"`
}

// Retry: the status codes to retry, how many attempts and the backoff, as Istio honours them.
type Retry struct {
	Codes    []int   `json:"codes,omitempty"`
	Attempts *int    `json:"attempts,omitempty"`
	Backoff  *string `json:"backoff,omitempty"`
}

// GRPCRoute is a gateway.networking.k8s.io GRPCRoute.
type GRPCRoute struct {
	APIVersion string          `json:"apiVersion,omitempty"`
	Kind       string          `json:"kind,omitempty"`
	Metadata   Metadata        `json:"metadata"`
	Spec       GRPCRouteSpec   `json:"spec"`
	Status     json.RawMessage `json:"status,omitempty"` // ignored
}

// GRPCRouteSpec: parents, hostnames (not used for Service parents) and rules.
type GRPCRouteSpec struct {
	ParentRefs []ParentRef `json:"parentRefs,omitempty"`
	Hostnames  []string    `json:"hostnames,omitempty"`
	Rules      []GRPCRule  `json:"rules,omitempty"`
}

// GRPCRule: matches (ORed), filters (header modifiers, mirror) and backends.
type GRPCRule struct {
	Name        *string      `json:"name,omitempty"`
	Matches     []GRPCMatch  `json:"matches,omitempty"`
	Filters     []Filter     `json:"filters,omitempty"`
	BackendRefs []BackendRef `json:"backendRefs,omitempty"`
}

// GRPCMatch: the gRPC method and headers.
type GRPCMatch struct {
	Method  *MethodMatch `json:"method,omitempty"`
	Headers []ValueMatch `json:"headers,omitempty"`
}

// MethodMatch: Type Exact (the default) or RegularExpression, on Service and/or Method.
type MethodMatch struct {
	Type    *string `json:"type,omitempty"`
	Service *string `json:"service,omitempty"`
	Method  *string `json:"method,omitempty"`
}

// DecodeHTTPRoute decodes one HTTPRoute (YAML or JSON) strictly: an unknown or unsupported
// field is an error, with the YAML line where the decoder can tell it.
func DecodeHTTPRoute(doc []byte) (*HTTPRoute, error) {
	var r HTTPRoute
	if err := DecodeStrict(doc, &r); err != nil {
		return nil, fmt.Errorf("httproute: HTTPRoute: %w", err)
	}
	return &r, nil
}

// DecodeGRPCRoute decodes one GRPCRoute as DecodeHTTPRoute does.
func DecodeGRPCRoute(doc []byte) (*GRPCRoute, error) {
	var r GRPCRoute
	if err := DecodeStrict(doc, &r); err != nil {
		return nil, fmt.Errorf("httproute: GRPCRoute: %w", err)
	}
	return &r, nil
}

// DecodeStrict decodes one Gateway API object (YAML or JSON) into v, refusing unknown and
// duplicate fields; sigs.k8s.io/yaml's strict mode names the YAML line of a syntax error.
// proxy/l4route decodes its routes with it too.
func DecodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}
