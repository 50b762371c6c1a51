// Package waypoint is the hbone.Handler that forwards like Istio's waypoint: each inbound CONNECT
// names a service VIP:port (or a pod IP:port); the waypoint picks a ready endpoint and opens HBONE
// to that pod's ztunnel (podIP:15008, authority podIP:targetPort) with its own identity, passing
// on Forwarded, baggage and traceparent. The 200 goes back only once that onward stream is up.
package waypoint

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
)

// DefaultHBONEPort is where a destination's ztunnel terminates HBONE.
const DefaultHBONEPort = 15008

// DefaultConnectTimeout bounds the onward dial to one endpoint.
const DefaultConnectTimeout = 5 * time.Second

// Handler forwards streams to their services' endpoints over HBONE.
type Handler struct {
	// Routes returns the current route table; it may change between streams.
	Routes func() *route.Table
	// Balancer spreads streams and ejects endpoints that fail to connect; nil means round robin
	// without ejection.
	Balancer *route.Balancer
	// Identity is the waypoint's own identity, presented on the onward hop.
	Identity identity.Source
	// Dialer opens the onward HBONE streams (pooled per endpoint and identity).
	Dialer *hbone.Dialer
	// Authorize, when set, decides each stream after routing; an error wrapping
	// hbone.ErrForbidden answers 403.
	Authorize func(*hbone.Request, *route.Destination) error
	// HBONEPort is the destination ztunnel's port; 0 means DefaultHBONEPort.
	HBONEPort uint16
	// ConnectTimeout bounds each onward attempt; 0 means DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// HalfCloseTimeout: see hbone.Splice.
	HalfCloseTimeout time.Duration
	// Metrics records streams and bytes; nil records nothing.
	Metrics *metrics.Metrics
	Logger  *slog.Logger // nil means slog.Default()

	tlsMu  sync.Mutex
	tlsFor map[spiffeid.ID]*tls.Config
}

// ServeHBONE routes, authorizes, connects onward (trying the next endpoint when one fails to
// connect), accepts and splices.
func (h *Handler) ServeHBONE(s *hbone.Stream) error {
	req := s.Request()
	if !req.Target.IsAddr() {
		return fmt.Errorf("waypoint: %w: a waypoint is addressed by IP, got %s", hbone.ErrBadAuthority, req.Target)
	}
	dest, err := h.Routes().Resolve(req.Target.Addr, h.Balancer)
	if err != nil {
		return fmt.Errorf("waypoint: %w: %w", hbone.ErrUnavailable, err)
	}
	if h.Authorize != nil {
		if err := h.Authorize(req, dest); err != nil {
			return err
		}
	}
	up, err := h.connect(s.Context(), req, dest)
	if err != nil {
		return err
	}
	if err := s.Accept(); err != nil {
		up.Close()
		return err
	}
	labels := metrics.Stream{SourcePrincipal: strings.TrimPrefix(req.PeerID.String(), "spiffe://")}
	if dest.Service != nil {
		labels.Service, labels.ServiceNamespace = dest.Service.Hostname, dest.Service.Namespace
	}
	h.Metrics.StreamOpened(labels)
	counts, err := hbone.SpliceCount(s, up, h.HalfCloseTimeout)
	h.Metrics.StreamClosed(labels, counts.AToB, counts.BToA)
	return err
}

// connect opens the onward stream to the first candidate that answers 200.
func (h *Handler) connect(ctx context.Context, req *hbone.Request, dest *route.Destination) (*hbone.Stream, error) {
	forwarded := req.Forwarded
	if forwarded == "" {
		if ap, err := netip.ParseAddrPort(req.RemoteAddr.String()); err == nil {
			forwarded = hbone.FormatForwarded(hbone.ForwardedElement{For: ap.String()})
		}
	}
	timeout := h.ConnectTimeout
	if timeout <= 0 {
		timeout = DefaultConnectTimeout
	}
	port := h.HBONEPort
	if port == 0 {
		port = DefaultHBONEPort
	}
	var errs []error
	for _, ep := range dest.Candidates {
		serverID, err := h.endpointID(dest, ep)
		if err != nil {
			return nil, err
		}
		tlsCfg, err := h.clientTLS(serverID)
		if err != nil {
			return nil, err
		}
		own, _ := h.Identity.Identity()
		if own == nil {
			return nil, fmt.Errorf("waypoint: %w", identity.ErrNoIdentity)
		}
		actx, cancel := context.WithTimeout(ctx, timeout)
		up, err := h.Dialer.Dial(actx, netip.AddrPortFrom(ep.Addr(), port).String(), ep.String(), hbone.DialOptions{
			TLSConfig:   tlsCfg,
			ServerID:    serverID.String(),
			LocalID:     own.SVID.ID.String(),
			Forwarded:   forwarded,
			Baggage:     req.Baggage,
			Traceparent: req.Traceparent,
		})
		cancel()
		if err == nil {
			h.Balancer.Succeeded(ep)
			return up, nil
		}
		var se *hbone.StatusError
		if !errors.As(err, &se) {
			h.Balancer.Failed(ep) // the endpoint's ztunnel did not answer: eject it for a while
		}
		h.log().Debug("waypoint: endpoint failed, trying the next", "endpoint", ep, "err", err)
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("waypoint: every endpoint of %s failed: %w", dest.Service.Hostname, errors.Join(errs...))
}

// endpointID is the identity the endpoint's ztunnel must present: the endpoint's service account.
func (h *Handler) endpointID(dest *route.Destination, ep netip.AddrPort) (spiffeid.ID, error) {
	own, _ := h.Identity.Identity()
	if own == nil {
		return spiffeid.ID{}, fmt.Errorf("waypoint: %w", identity.ErrNoIdentity)
	}
	for _, e := range dest.Service.Endpoints {
		if e.IP == ep.Addr() && e.ServiceAccount != "" {
			ns := e.Namespace
			if ns == "" {
				ns = dest.Service.Namespace
			}
			return spiffeid.FromSegments(own.Bundle.TrustDomain(), "ns", ns, "sa", e.ServiceAccount)
		}
	}
	return spiffeid.ID{}, fmt.Errorf("waypoint: %w: endpoint %s of %s has no service account, so its identity cannot be checked", hbone.ErrUnavailable, ep, dest.Service.Hostname)
}

func (h *Handler) clientTLS(id spiffeid.ID) (*tls.Config, error) {
	h.tlsMu.Lock()
	defer h.tlsMu.Unlock()
	if c, ok := h.tlsFor[id]; ok {
		return c, nil
	}
	c, err := identity.ClientTLS(h.Identity, id)
	if err != nil {
		return nil, err
	}
	if h.tlsFor == nil {
		h.tlsFor = map[spiffeid.ID]*tls.Config{}
	}
	h.tlsFor[id] = c
	return c, nil
}

func (h *Handler) log() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.Default()
}
