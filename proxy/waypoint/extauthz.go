package waypoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/extauthz"
)

// ask calls a CUSTOM policy's provider for one request or stream.
type ask func(*extauthz.Checker) extauthz.Result

// customDenial is a request the provider denied, or a failed check: the client gets the
// provider's answer.
type customDenial struct {
	res    extauthz.Result
	reason string
}

func (e *customDenial) Error() string { return hbone.ErrForbidden.Error() + ": " + e.reason }
func (e *customDenial) Unwrap() error { return hbone.ErrForbidden }

// custom asks the provider the CUSTOM policy c names (check nil: the stream cannot be checked,
// so it stays denied). It reports whether the provider allowed, the decision's reason (on an
// allow, a note to append, usually ""; "" on a denial: the engine's reason stands), and the
// provider's denial to answer, if it gave one. Without h.ExtAuthz, or a provider of that name,
// the request stays denied as the engine decided.
func (h *Handler) custom(req *authz.Request, c *authz.Custom, check ask) (bool, string, *customDenial) {
	chk, err := h.ExtAuthz.Checker(c.Provider)
	if err != nil {
		return false, "", nil
	}
	if req.HTTP == nil && !chk.Streams() {
		// istiod builds no network ext_authz filter for an HTTP provider (builder.go buildTCP:
		// "ignored CUSTOM action with HTTP provider on TCP filter chain"): on an opaque stream
		// the CUSTOM policy takes no part.
		return true, fmt.Sprintf(" (CUSTOM policy %s: HTTP provider %q is not called for an opaque stream, as in istiod)", c.Policy, c.Provider), nil
	}
	if check == nil {
		return false, fmt.Sprintf("denied by CUSTOM policy %s: provider %q cannot be asked here", c.Policy, c.Provider), nil
	}
	res := check(chk)
	if !res.Allow {
		reason := fmt.Sprintf("denied by ext_authz provider %q (CUSTOM policy %s): status %d", c.Provider, c.Policy, res.Status)
		if res.Local {
			reason = fmt.Sprintf("refused before asking ext_authz provider %q (CUSTOM policy %s, includeRequestBodyInCheck): status %d", c.Provider, c.Policy, res.Status)
		}
		if res.Err != nil {
			reason += ": " + res.Err.Error()
		}
		return false, reason, &customDenial{res: res, reason: reason}
	}
	if res.Err != nil {
		return true, fmt.Sprintf(" (ext_authz provider %q failed open: %v)", c.Provider, res.Err), nil
	}
	return true, "", nil
}

// pendingCheck is the CUSTOM call of a stream decided at CONNECT time: the plan does no I/O, so
// ServeHBONE asks the provider before anything is dialed.
type pendingCheck struct {
	req *authz.Request
	dec authz.Decision
}

// decideStream is authorize for a stream decided at CONNECT time: a decision that needs a
// provider is left pending (nil error), any other is settled.
func (h *Handler) decideStream(engine *authz.Engine, req *authz.Request, r *hbone.Request) (*pendingCheck, error) {
	if engine == nil {
		return nil, nil
	}
	dec := engine.Decide(req)
	if dec.Custom != nil {
		if _, err := h.ExtAuthz.Checker(dec.Custom.Provider); err == nil {
			return &pendingCheck{req: req, dec: dec}, nil
		}
	}
	return nil, h.settle(req, r, dec, nil)
}

// checkStream asks the provider about an opaque stream (a gRPC provider: Envoy's network
// ext_authz filter, which sends the source, its principal and the destination).
func (h *Handler) checkStream(ctx context.Context, r *hbone.Request) ask {
	return func(c *extauthz.Checker) extauthz.Result {
		return c.Check(ctx, &extauthz.Request{Source: peerAddr(r), Destination: r.Target.Addr, Principal: r.PeerID.String()})
	}
}

func peerAddr(r *hbone.Request) netip.AddrPort {
	ap, err := netip.ParseAddrPort(r.RemoteAddr.String())
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// checkHTTP asks the provider about r; on an allow it applies the provider's header changes
// to r (upstream) and w (the response).
func (hs *httpStream) checkHTTP(w http.ResponseWriter, r *http.Request) ask {
	return func(c *extauthz.Checker) extauthz.Result {
		xr := &extauthz.Request{Source: peerAddr(hs.req), Destination: hs.req.Target.Addr, Principal: hs.req.PeerID.String(), HTTP: r,
			SetReadDeadline: http.NewResponseController(w).SetReadDeadline}
		res := c.Check(r.Context(), xr)
		if !res.Allow {
			return res
		}
		for k, vs := range res.UpstreamSet {
			r.Header[http.CanonicalHeaderKey(k)] = vs
		}
		for k, vs := range res.UpstreamAppend {
			for _, v := range vs {
				r.Header.Add(k, v)
			}
		}
		for _, k := range res.UpstreamRemove {
			r.Header.Del(k)
		}
		for k, vs := range res.Downstream {
			for _, v := range vs {
				w.Header().Add(k, v)
			}
		}
		return res
	}
}

// deny answers a denied request: the provider's answer for a CUSTOM denial (status, headers,
// body; a gRPC client gets the status Envoy maps it to; response flag UAEX, not for the
// waypoint's own refusal of a body it could not buffer for the check), else Envoy's 403.
func deny(w http.ResponseWriter, grpc bool, err error) {
	var cd *customDenial
	if !errors.As(err, &cd) {
		localReply(w, grpc, http.StatusForbidden, 7, "RBAC: access denied")
		return
	}
	if rec, ok := w.(*recorder); ok && !cd.res.Local {
		rec.flags = "UAEX" // Envoy's response flag for a denial by the external authorization service
	}
	for k, vs := range cd.res.Header {
		w.Header()[http.CanonicalHeaderKey(k)] = vs
	}
	if grpc {
		msg := string(cd.res.Body)
		if msg == "" {
			msg = http.StatusText(cd.res.Status)
		}
		localReply(w, true, cd.res.Status, extauthz.GRPCStatus(cd.res.Status), msg)
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(cd.res.Body)))
	w.WriteHeader(cd.res.Status)
	io.WriteString(w, string(cd.res.Body))
}
