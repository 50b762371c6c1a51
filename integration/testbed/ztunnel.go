package testbed

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"net"
	"net/netip"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity/istioca"
)

// TrustDomain is the test bed mesh's trust domain.
const TrustDomain = "cluster.local"

// Workload is a mesh identity obtained from istiod's CA for a service account, as ztunnel holds
// one per pod.
type Workload struct {
	Namespace, ServiceAccount string
	SVID                      *x509svid.SVID
	Bundle                    *x509bundle.Bundle
}

// Workload gets a certificate for ns/sa from istiod's CA with a TokenRequest token (audience
// istio-ca), creating the namespace and service account if needed.
func (c *Cluster) Workload(ctx context.Context, ns, sa string) (*Workload, error) {
	if err := c.Namespace(ctx, ns, nil); err != nil {
		return nil, err
	}
	token, err := c.ServiceAccountToken(ctx, ns, sa, "istio-ca")
	if err != nil {
		return nil, err
	}
	key, err := istioca.NewKey()
	if err != nil {
		return nil, err
	}
	cl := &istioca.Client{Addr: c.Istiod.CAAddr, ServerName: c.Istiod.ServerName, RootCAs: c.Istiod.Roots,
		Token: func(context.Context) (string, error) { return token, nil }}
	svid, err := cl.Sign(ctx, key, time.Hour)
	if err != nil {
		return nil, err
	}
	td := spiffeid.RequireTrustDomainFromString(TrustDomain)
	return &Workload{Namespace: ns, ServiceAccount: sa, SVID: svid, Bundle: x509bundle.FromX509Authorities(td, []*x509.Certificate{c.Istiod.Root})}, nil
}

// ServerTLS is the TLS config of an HBONE terminator with this identity: it requires a client
// certificate from the mesh (ztunnel's inbound rule).
func (w *Workload) ServerTLS() *tls.Config {
	return tlsconfig.MTLSServerConfig(w.SVID, w.Bundle, tlsconfig.AuthorizeMemberOf(w.Bundle.TrustDomain()))
}

// ClientTLS is the TLS config of an HBONE client with this identity that requires the server to
// be serverID (ztunnel's outbound rule).
func (w *Workload) ClientTLS(serverID string) *tls.Config {
	return tlsconfig.MTLSClientConfig(w.SVID, w.Bundle, tlsconfig.AuthorizeID(spiffeid.RequireFromString(serverID)))
}

// Ztunnel stands in for ztunnel's outbound side for one source workload: it sends HBONE with the
// source's certificate and the headers ztunnel's create_hbone_request sends (src/proxy/outbound.rs:
// Forwarded with the original source and the intended service's hostname, baggage, a new
// traceparent per connection).
type Ztunnel struct {
	Source *Workload
	Dialer *hbone.Dialer
	// Baggage is the source's baggage header (WorkloadView.Baggage); "" means one made from
	// Source's namespace and service account.
	Baggage string
}

// NewZtunnel returns a ztunnel stand-in whose connections are dialed with netDial (nil: the
// root network namespace), e.g. a Pod's DialContext.
func NewZtunnel(src *Workload, netDial func(ctx context.Context, network, addr string) (net.Conn, error)) *Ztunnel {
	return &Ztunnel{Source: src, Dialer: &hbone.Dialer{NetDial: netDial}}
}

// Request is one HBONE stream as ztunnel's build_request computes it.
type Request struct {
	Proxy     string // the next hop, IP:15008 (a waypoint or the destination's ztunnel)
	ServerID  string // the identity the next hop must present
	Authority string // the CONNECT authority
	Source    netip.AddrPort
	Host      string // the intended service's hostname, "" for pod-addressed traffic
	Baggage   string // "" means the Ztunnel's
}

// Dial opens an HBONE stream to target through proxyAddr, whose identity must be serverID, as
// coming from the client address src.
func (z *Ztunnel) Dial(ctx context.Context, proxyAddr, serverID, target string, src netip.AddrPort) (*hbone.Stream, error) {
	return z.Send(ctx, Request{Proxy: proxyAddr, ServerID: serverID, Authority: target, Source: src})
}

// Send opens the HBONE stream r describes, with ztunnel's headers: Forwarded as build_forwarded
// writes it (for="IP:port", plus ;host=HOSTNAME when service-addressed), baggage, and a
// traceparent as TraceParent::new in src/proxy.rs (version 00, random 128-bit trace and 64-bit
// parent ids, flags 00).
func (z *Ztunnel) Send(ctx context.Context, r Request) (*hbone.Stream, error) {
	trace := make([]byte, 24)
	rand.Read(trace)
	baggage := r.Baggage
	if baggage == "" {
		baggage = z.Baggage
	}
	if baggage == "" {
		baggage = "k8s.cluster.name=Kubernetes,k8s.namespace.name=" + z.Source.Namespace + ",k8s.deployment.name=" + z.Source.ServiceAccount
	}
	return z.Dialer.Dial(ctx, r.Proxy, r.Authority, hbone.DialOptions{
		TLSConfig:   z.Source.ClientTLS(r.ServerID),
		ServerID:    r.ServerID,
		LocalID:     z.Source.SVID.ID.String(),
		Forwarded:   hbone.FormatForwarded(hbone.ForwardedElement{For: r.Source.String(), Host: r.Host}),
		Baggage:     baggage,
		Traceparent: "00-" + hex.EncodeToString(trace[:16]) + "-" + hex.EncodeToString(trace[16:]) + "-00",
	})
}

// Close releases the ztunnel's pooled connections.
func (z *Ztunnel) Close() error { return z.Dialer.Close() }
