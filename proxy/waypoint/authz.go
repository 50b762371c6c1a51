package waypoint

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
)

// Authorizer enforces engine's AuthorizationPolicies on each stream at CONNECT time, with the
// attributes an opaque stream has: the peer identity, the original source (Forwarded), the
// destination. A denial answers 403 before any byte reaches the destination. HTTP attributes come
// with L7 parsing (not yet: HTTP-only rules fail closed, see package authz).
func Authorizer(engine func() *authz.Engine, log *slog.Logger, m *metrics.Metrics) func(*hbone.Request, *route.Destination) error {
	if log == nil {
		log = slog.Default()
	}
	return func(r *hbone.Request, d *route.Destination) error {
		req := &authz.Request{
			Principal: strings.TrimPrefix(r.PeerID.String(), "spiffe://"),
			DestIP:    r.Target.Addr.Addr(),
			DestPort:  r.Target.Addr.Port(),
		}
		if src, ok := r.OriginalSource(); ok {
			req.SourceIP = src.Addr()
		} else if ap, err := netip.ParseAddrPort(r.RemoteAddr.String()); err == nil {
			req.SourceIP = ap.Addr()
		}
		if d.Service != nil {
			req.Service = authz.Service{Namespace: d.Service.Namespace, Name: d.Service.Name}
		}
		dec := engine().Decide(req)
		m.Decision(dec.Allow, dec.Policy)
		if len(dec.Audit) > 0 {
			log.Info("authz: audit", "policies", dec.Audit, "principal", req.Principal, "target", r.Target.String(), "decision", dec.String())
		}
		if !dec.Allow {
			return fmt.Errorf("%w: RBAC: access denied: %s", hbone.ErrForbidden, dec.Reason)
		}
		return nil
	}
}
