// Package config is detour's one configuration document (YAML): identity source, listeners,
// waypoint registration, and discovery. Flags only say where the document is; every field below
// says its default. Decode is strict: an unknown field is an error, so a typo never silently
// falls back to a default.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	"sigs.k8s.io/yaml"

	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
)

// Config is the whole document.
type Config struct {
	Identity  Identity  `json:"identity"`
	Listeners Listeners `json:"listeners"`
	Waypoint  Waypoint  `json:"waypoint"`
	Discovery Discovery `json:"discovery"`
}

// Identity chooses where detour's certificate comes from.
type Identity struct {
	// Source is one of devca, files, istio-ca, workload-api. Required.
	Source string `json:"source"`
	// DevCA: a CA directory made by `detour ca init`, and the ID to mint for detour.
	DevCA *DevCA `json:"devca,omitempty"`
	// Files: cert, key and bundle PEM files, polled for changes.
	Files *Files `json:"files,omitempty"`
	// IstioCA: istiod's CA.
	IstioCA *IstioCA `json:"istioCA,omitempty"`
	// WorkloadAPI: a SPIFFE Workload API socket.
	WorkloadAPI *WorkloadAPI `json:"workloadAPI,omitempty"`
}

// DevCA: see identity/devca.
type DevCA struct {
	Dir string `json:"dir"` // required
	ID  string `json:"id"`  // required: spiffe://<td>/ns/<ns>/sa/<sa>
}

// Files: see identity.Files.
type Files struct {
	Cert   string `json:"cert"`
	Key    string `json:"key"`
	Bundle string `json:"bundle"`
}

// IstioCA: see identity.IstioCA.
type IstioCA struct {
	Addr         string   `json:"addr"`         // default istiod.istio-system.svc:15012
	RootCertFile string   `json:"rootCertFile"` // default /var/run/secrets/istio/root-cert.pem
	TokenFile    string   `json:"tokenFile"`    // default /var/run/secrets/tokens/istio-token
	ClusterID    string   `json:"clusterID"`    // default Kubernetes
	TrustDomain  string   `json:"trustDomain"`  // default cluster.local
	TTL          Duration `json:"ttl"`          // default: istiod's (24h)
}

// WorkloadAPI: see identity.WorkloadAPI.
type WorkloadAPI struct {
	Addr string `json:"addr"` // e.g. unix:///run/spire/sockets/agent.sock; required
}

// Listeners are detour's addresses.
type Listeners struct {
	HBONE  string `json:"hbone"`  // default 0.0.0.0:15008
	Health string `json:"health"` // /healthz, /readyz; default 127.0.0.1:15021; "off" disables
	// Tunnel is where developers' tunnels arrive: QUIC on UDP and HTTP/2 on TCP, same address.
	// Default 0.0.0.0:15009; "off" disables debug sessions.
	Tunnel string `json:"tunnel"`
	// Advertise is this replica's HBONE address as other replicas dial it (to relay streams of
	// sessions it holds); default $POD_IP with the HBONE port, else the HBONE listener's address.
	Advertise string `json:"advertise"`
	// UpstreamHBONEPort is the port of the destination ztunnels; default 15008.
	UpstreamHBONEPort uint16 `json:"upstreamHBONEPort"`
}

// Waypoint says which Gateway detour is, for AuthorizationPolicy targetRefs.
type Waypoint struct {
	Namespace     string `json:"namespace"`     // required
	Gateway       string `json:"gateway"`       // default detour
	RootNamespace string `json:"rootNamespace"` // default istio-system
	// Inspect: auto (default) parses HTTP where Istio's waypoint does (ports declared
	// HTTP/HTTP2/gRPC, undeclared ports sniffed as HTTP): each request authorized (403 on a
	// denial), balanced and counted; declared TCP/TLS ports and non-HTTP bytes stay opaque.
	// always also sniffs declared TLS ports. opaque looks inside only when a policy needs HTTP
	// or SNI attributes (a denied HTTP client gets a refused CONNECT).
	Inspect string `json:"inspect"`
	// Balancer: round-robin (default) or least-request (the less busy of two endpoints drawn at
	// random, counting streams and HTTP requests in flight).
	Balancer string `json:"balancer"`
	// BindTTL: how long a session's binding of a service outlives its waypoint (Kubernetes
	// discovery only; a lease renewed while the session lives). Default 15s.
	BindTTL Duration `json:"bindTTL"`
	// SessionGrace: how long a debug session outlives its lost tunnel, its traffic going to the
	// real service, waiting for the developer's CLI to reconnect and resume it (a CLI may ask for
	// less). Default 30s, at most 10m; negative: sessions end with their tunnel.
	SessionGrace Duration `json:"sessionGrace"`
	// AccessLog: true writes one JSON record per HTTP request and per opaque stream to stderr.
	// Default false.
	AccessLog bool `json:"accessLog"`
	// NumTrustedProxies: how many proxies in front of the clients append to X-Forwarded-For
	// (Istio's numTrustedProxies): remote.ip and remoteIpBlocks use the (n+1)th address from
	// the right (see authz.RemoteIP). Default 0, the rightmost.
	NumTrustedProxies int `json:"numTrustedProxies"`
	// SniffWait bounds, per stream, the wait for the client bytes that decide its protocol (or
	// SNI) where Istio's waypoint waits for its listener filters: undeclared ports and ports
	// declared TLS. When it runs out the stream is reset, as Envoy closes it. Default 15s
	// (Envoy's listener_filters_timeout default, which Istio's waypoint keeps; the mesh config's
	// protocolDetectionTimeout is for sidecars and does not apply to waypoints), 1ms..5m.
	SniffWait Duration `json:"sniffWait"`
	// MaxSniffingPerClient bounds the streams of one client (its identity) waiting for those
	// bytes at once; one more is refused with a 503 before anything is dialed. Default 64.
	MaxSniffingPerClient int `json:"maxSniffingPerClient"`
	// Drain is how the replica ends on SIGTERM (a pod deletion): see Drain.
	Drain Drain `json:"drain"`
}

// Drain is the replica's graceful termination (proxy/drain): on SIGTERM /readyz fails at once;
// the replica keeps accepting and serving for Period while its endpoint's removal reaches the
// clients (EndpointSlice, istiod, every ztunnel), each HBONE connection told to move (GOAWAY);
// then it stops accepting and gives the streams still open Timeout to finish, and closes the
// rest. The pod's terminationGracePeriodSeconds must cover Period + Timeout (detour install
// writes 30 for the defaults' 25s).
type Drain struct {
	// Period: default 5s with Kubernetes discovery (Istio's terminationDrainDuration), 0s with
	// static discovery (no endpoints to propagate); "0s" stops accepting at once; at most 5m.
	Period *Duration `json:"period,omitempty"`
	// Timeout: default 20s; "0s" closes what is open when the period ends; at most 1h.
	Timeout *Duration `json:"timeout,omitempty"`
}

// Default drain durations (Drain; the period with Kubernetes discovery).
const (
	DefaultDrainPeriod  = 5 * time.Second
	DefaultDrainTimeout = 20 * time.Second
)

// Discovery chooses where services, endpoints and policies come from.
type Discovery struct {
	// Source: static (this document) or kubernetes (informers on the API server). Default static.
	Source     string      `json:"source"`
	Static     *Static     `json:"static,omitempty"`
	Kubernetes *Kubernetes `json:"kubernetes,omitempty"`
}

// Kubernetes discovery.
type Kubernetes struct {
	// Kubeconfig is a kubeconfig file; "" means the in-cluster service account.
	Kubeconfig string `json:"kubeconfig"`
	// Namespace limits discovery to one namespace (a per-namespace waypoint); "" watches all.
	Namespace string `json:"namespace"`
}

// Static lists services and policies in the document.
type Static struct {
	Services []Service `json:"services"`
	Policies []Policy  `json:"policies"`
	// RequestAuthentications are security.istio.io RequestAuthentication objects (JWT rules),
	// bound by targetRefs as AuthorizationPolicies. Default none.
	RequestAuthentications []RequestAuthentication `json:"requestAuthentications"`
	// ExtensionProviders are Istio's mesh config extensionProviders, as in istiod's `istio`
	// ConfigMap (which Kubernetes discovery reads instead): the envoyExtAuthzHttp and
	// envoyExtAuthzGrpc providers CUSTOM policies name, e.g. {name: opa, envoyExtAuthzGrpc:
	// {service: opa.demo.svc.cluster.local, port: 9191, timeout: 1s}}. service is a host name
	// (or IP) the waypoint resolves and dials directly, not over HBONE. Default none: CUSTOM
	// policies deny what they match.
	ExtensionProviders []ExtensionProvider `json:"extensionProviders"`
	// HTTPRoutes and GRPCRoutes are Gateway API objects (gateway.networking.k8s.io/v1) whose
	// parentRefs name services above; see proxy/httproute for the fields detour implements (any
	// other is refused). A route applies, to every caller, to parent services in its own
	// namespace or, when it is in waypoint.namespace, in any namespace; a route naming a service
	// in a third namespace is refused (Istio's waypoint would not apply it). Default none.
	HTTPRoutes []httproute.HTTPRoute `json:"httpRoutes,omitempty"`
	GRPCRoutes []httproute.GRPCRoute `json:"grpcRoutes,omitempty"`
	// TCPRoutes and TLSRoutes are Gateway API objects (gateway.networking.k8s.io/v1 or
	// v1alpha2) whose parentRefs name services above; see proxy/l4route for the fields detour
	// implements (any other is refused). Namespaces as for HTTPRoutes. Default none.
	TCPRoutes []l4route.TCPRoute `json:"tcpRoutes,omitempty"`
	TLSRoutes []l4route.TLSRoute `json:"tlsRoutes,omitempty"`
}

// Service is a mesh service and its endpoints.
type Service struct {
	Name      string     `json:"name"`
	Namespace string     `json:"namespace"`
	Hostname  string     `json:"hostname"` // default name.namespace.svc.cluster.local
	VIPs      []string   `json:"vips"`
	Ports     []Port     `json:"ports"`
	Endpoints []Endpoint `json:"endpoints"`
}

// Port of a service.
type Port struct {
	Name        string `json:"name"`
	Port        uint16 `json:"port"`
	TargetPort  uint16 `json:"targetPort"` // default Port
	AppProtocol string `json:"appProtocol"`
}

// Endpoint of a service.
type Endpoint struct {
	IP             string `json:"ip"`
	ServiceAccount string `json:"serviceAccount"` // required: the identity its ztunnel presents
	NotReady       bool   `json:"notReady"`
	// Workload names the endpoint's workload in Istio's metric labels (destination_workload);
	// default the service's name.
	Workload string `json:"workload,omitempty"`
	// Labels are the pod's labels, for the canonical service and revision, app and version
	// labels of Istio's metrics. Default none.
	Labels map[string]string `json:"labels,omitempty"`
}

// Policy is an AuthorizationPolicy.
type Policy struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	// Annotations as on the Kubernetes object; `istio.io/dry-run: "true"` evaluates and logs the
	// policy without enforcing it. Default none.
	Annotations map[string]string               `json:"annotations,omitempty"`
	Spec        *secv1beta1.AuthorizationPolicy `json:"spec"`
}

// Duration is a time.Duration written as "90s" or "24h".
type Duration struct{ time.Duration }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration: %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// Load reads and decodes the document at path.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := Decode(b)
	if err != nil {
		return nil, fmt.Errorf("config: %s: %w", path, err)
	}
	return c, nil
}

// Decode parses a YAML document strictly, applies defaults and validates it.
func Decode(doc []byte) (*Config, error) {
	j, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return nil, err
	}
	if err := checkPolicies(doc); err != nil {
		return nil, err
	}
	if err := checkRequestAuthentications(doc); err != nil {
		return nil, err
	}
	if err := checkRoutes(doc); err != nil {
		return nil, err
	}
	if err := checkProviders(doc); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, err
	}
	c.defaults()
	if err := c.validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

func (c *Config) defaults() {
	set := func(v *string, d string) {
		if *v == "" {
			*v = d
		}
	}
	set(&c.Listeners.HBONE, "0.0.0.0:15008")
	set(&c.Listeners.Health, "127.0.0.1:15021")
	set(&c.Listeners.Tunnel, "0.0.0.0:15009")
	if c.Listeners.UpstreamHBONEPort == 0 {
		c.Listeners.UpstreamHBONEPort = 15008
	}
	set(&c.Waypoint.Gateway, "detour")
	set(&c.Waypoint.RootNamespace, "istio-system")
	set(&c.Waypoint.Inspect, "auto")
	set(&c.Waypoint.Balancer, "round-robin")
	set(&c.Discovery.Source, "static")
	if c.Waypoint.Drain.Period == nil {
		c.Waypoint.Drain.Period = &Duration{}
		if c.Discovery.Source == "kubernetes" {
			c.Waypoint.Drain.Period.Duration = DefaultDrainPeriod
		}
	}
	if c.Waypoint.Drain.Timeout == nil {
		c.Waypoint.Drain.Timeout = &Duration{DefaultDrainTimeout}
	}
	if ca := c.Identity.IstioCA; ca != nil {
		set(&ca.Addr, "istiod.istio-system.svc:15012")
		set(&ca.RootCertFile, "/var/run/secrets/istio/root-cert.pem")
		set(&ca.TokenFile, "/var/run/secrets/tokens/istio-token")
		set(&ca.ClusterID, "Kubernetes")
		set(&ca.TrustDomain, "cluster.local")
	}
	if s := c.Discovery.Static; s != nil {
		for i := range s.Services {
			svc := &s.Services[i]
			set(&svc.Hostname, svc.Name+"."+svc.Namespace+".svc.cluster.local")
			for j := range svc.Ports {
				if svc.Ports[j].TargetPort == 0 {
					svc.Ports[j].TargetPort = svc.Ports[j].Port
				}
			}
		}
	}
}

func (c *Config) validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	id := c.Identity
	switch id.Source {
	case "devca":
		if id.DevCA == nil || id.DevCA.Dir == "" || id.DevCA.ID == "" {
			bad("identity.devca.dir and identity.devca.id are required with source devca")
		}
	case "files":
		if id.Files == nil || id.Files.Cert == "" || id.Files.Key == "" || id.Files.Bundle == "" {
			bad("identity.files.cert, .key and .bundle are required with source files")
		}
	case "istio-ca":
		if id.IstioCA == nil {
			bad("identity.istioCA is required with source istio-ca")
		}
	case "workload-api":
		if id.WorkloadAPI == nil || id.WorkloadAPI.Addr == "" {
			bad("identity.workloadAPI.addr is required with source workload-api")
		}
	case "":
		bad("identity.source is required: devca, files, istio-ca or workload-api")
	default:
		bad("identity.source %q is not one of devca, files, istio-ca, workload-api", id.Source)
	}
	if c.Waypoint.Namespace == "" {
		bad("waypoint.namespace is required")
	}
	if b := c.Waypoint.Balancer; b != "round-robin" && b != "least-request" {
		bad("waypoint.balancer %q is not one of round-robin, least-request", b)
	}
	if i := c.Waypoint.Inspect; i != "auto" && i != "always" && i != "opaque" {
		bad("waypoint.inspect %q is not one of auto, always, opaque", i)
	}
	if n := c.Waypoint.NumTrustedProxies; n < 0 {
		bad("waypoint.numTrustedProxies %d is negative; use 0 (the rightmost X-Forwarded-For address) or more", n)
	}
	if t := c.Waypoint.BindTTL.Duration; t < 0 || t > time.Hour {
		bad("waypoint.bindTTL %s is outside 0s..1h (the other replicas ignore a longer one)", t)
	}
	if t := c.Waypoint.SessionGrace.Duration; t > 10*time.Minute {
		bad("waypoint.sessionGrace %s is over 10m", t)
	}
	if t := c.Waypoint.SniffWait.Duration; t != 0 && (t < time.Millisecond || t > 5*time.Minute) {
		bad("waypoint.sniffWait %s is outside 1ms..5m (the default, 15s, is Envoy's listener filter timeout)", t)
	}
	if n := c.Waypoint.MaxSniffingPerClient; n < 0 {
		bad("waypoint.maxSniffingPerClient %d is negative; leave it out for the default (64)", n)
	}
	if t := c.Waypoint.Drain.Period.Duration; t < 0 || t > 5*time.Minute {
		bad("waypoint.drain.period %s is outside 0s..5m", t)
	}
	if t := c.Waypoint.Drain.Timeout.Duration; t < 0 || t > time.Hour {
		bad("waypoint.drain.timeout %s is outside 0s..1h", t)
	}
	switch c.Discovery.Source {
	case "static":
		if c.Discovery.Static == nil {
			bad("discovery.static is required with source static")
		}
	case "kubernetes":
		if c.Discovery.Static != nil {
			bad("discovery.static is not used with source kubernetes; remove it")
		}
	default:
		bad("discovery.source %q is not one of static, kubernetes", c.Discovery.Source)
	}
	if s := c.Discovery.Static; s != nil {
		for _, svc := range s.Services {
			where := "service " + svc.Namespace + "/" + svc.Name
			if svc.Name == "" || svc.Namespace == "" {
				bad("a service needs a name and a namespace")
			}
			for _, v := range svc.VIPs {
				if _, err := netip.ParseAddr(v); err != nil {
					bad("%s: vip %q: %v", where, v, err)
				}
			}
			for _, p := range svc.Ports {
				if p.Port == 0 {
					bad("%s: a port needs a number", where)
				}
			}
			for _, e := range svc.Endpoints {
				if _, err := netip.ParseAddr(e.IP); err != nil {
					bad("%s: endpoint ip %q: %v", where, e.IP, err)
				}
				if e.ServiceAccount == "" {
					bad("%s: endpoint %s needs serviceAccount (the identity its ztunnel presents)", where, e.IP)
				}
			}
		}
		for _, p := range s.Policies {
			if p.Name == "" || p.Namespace == "" || p.Spec == nil {
				bad("a policy needs name, namespace and spec")
			}
		}
		errs = append(errs, validateRequestAuthentications(s.RequestAuthentications)...)
		errs = append(errs, validateProviders(s)...)
		if len(errs) == 0 {
			if _, err := c.HTTPRoutes(); err != nil {
				errs = append(errs, err)
			}
			if _, err := c.L4Routes(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
