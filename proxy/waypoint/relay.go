package waypoint

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Relays between waypoint replicas: a stream stolen on one replica for a session whose tunnel
// another replica holds goes there over HBONE (authority RelayTarget, the session and the stream's
// Meta in headers), presented with the waypoint's own identity; the holder accepts relays only
// from that identity (its own service account: another replica).
const (
	RelayTarget        = session.RelayHost + ":1"
	headerRelaySession = "Detour-Session"
	headerRelayMeta    = "Detour-Meta"
)

// RelayOpener opens streams of the session sessionID held by the replica at addr.
func (h *Handler) RelayOpener(addr, sessionID string) session.Opener {
	return relayOpener{h: h, addr: addr, id: sessionID}
}

type relayOpener struct {
	h        *Handler
	addr, id string
}

func (r relayOpener) Open(ctx context.Context, m tunnel.Meta) (net.Conn, error) {
	own, _ := r.h.Identity.Identity()
	if own == nil {
		return nil, &tunnel.OpenError{Err: identity.ErrNoIdentity}
	}
	tlsCfg, err := r.h.clientTLS(own.SVID.ID)
	if err != nil {
		return nil, &tunnel.OpenError{Err: err}
	}
	meta, err := json.Marshal(m)
	if err != nil {
		return nil, &tunnel.OpenError{Err: err}
	}
	dctx, cancel := context.WithTimeout(ctx, DefaultConnectTimeout)
	defer cancel()
	s, err := r.h.Dialer.Dial(dctx, r.addr, RelayTarget, hbone.DialOptions{TLSConfig: tlsCfg, ServerID: own.SVID.ID.String(),
		LocalID: own.SVID.ID.String(), Tenant: m.Source, // one client's relayed streams never share a connection with another's
		Header: http.Header{headerRelaySession: {r.id}, headerRelayMeta: {string(meta)}}})
	if err != nil {
		return nil, &tunnel.OpenError{Peer: own.SVID.ID, Err: fmt.Errorf("relaying to replica %s: %w", r.addr, err)}
	}
	return s, nil
}

// serveRelay takes a stream relayed by another replica into the local session's tunnel.
func (h *Handler) serveRelay(s *hbone.Stream) error {
	req := s.Request()
	own, _ := h.Identity.Identity()
	if own == nil {
		return fmt.Errorf("waypoint: %w", identity.ErrNoIdentity)
	}
	if req.PeerID != own.SVID.ID {
		return fmt.Errorf("waypoint: %w: relays are accepted only from replicas of this waypoint (%v), not %v", hbone.ErrForbidden, own.SVID.ID, req.PeerID)
	}
	id, m, err := relayHeaders(req.Header)
	if err != nil {
		return err
	}
	st := h.Sessions.Get(id)
	if st == nil || st.Remote {
		return fmt.Errorf("waypoint: %w: no local session %q", hbone.ErrUnavailable, id)
	}
	if m.Kind == tunnel.KindProbe {
		dev, err := st.Open(s.Context(), m)
		if err != nil {
			return fmt.Errorf("waypoint: %w: %w", hbone.ErrUnavailable, err)
		}
		dev.Close() // a probe's answer is the 200: the developer acknowledged
		return s.Accept()
	}
	handled, _, err := st.Take(s.Context(), s, m, s.Accept, h.HalfCloseTimeout)
	if !handled {
		return fmt.Errorf("waypoint: %w: %w", hbone.ErrUnavailable, err)
	}
	return err
}

// relayHeaders reads a relayed stream's session and Meta: a stream of a session (a whole stream or
// an HTTP connection), never anything else a data stream can be (the egress link).
func relayHeaders(h http.Header) (id string, m tunnel.Meta, err error) {
	dec := json.NewDecoder(strings.NewReader(h.Get(headerRelayMeta)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return "", m, fmt.Errorf("waypoint: %w: relay meta: %v", hbone.ErrBadAuthority, err)
	}
	if dec.More() {
		return "", m, fmt.Errorf("waypoint: %w: relay meta: trailing data", hbone.ErrBadAuthority)
	}
	if m.Kind != tunnel.KindTCP && m.Kind != tunnel.KindHTTP && m.Kind != tunnel.KindProbe {
		return "", m, fmt.Errorf("waypoint: %w: relay meta: kind %q is not tcp, http or probe", hbone.ErrBadAuthority, m.Kind)
	}
	return h.Get(headerRelaySession), m, nil
}
