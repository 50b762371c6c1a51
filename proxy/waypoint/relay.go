package waypoint

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Relays between waypoint replicas: a stream stolen on one replica for a session whose tunnel
// another replica holds goes there over HBONE (authority RelayTarget, the session and the stream's
// Meta in headers), presented with the waypoint's own identity; the holder accepts relays only
// from that identity (its own service account: another replica). A relay with Detour-End instead of
// a Meta asks the holder to end the session (`detour sessions end` on a replica that does not hold
// it, which authorized the request; the header names who asked); the holder answers with a
// tunnel.Reply on the stream once the session is released.
const (
	RelayTarget        = session.RelayHost + ":1"
	headerRelaySession = "Detour-Session"
	headerRelayMeta    = "Detour-Meta"
	headerRelayEnd     = "Detour-End"
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
	meta, err := json.Marshal(m)
	if err != nil {
		return nil, &tunnel.OpenError{Err: err}
	}
	dctx, cancel := context.WithTimeout(ctx, DefaultConnectTimeout)
	defer cancel()
	// Tenant: one client's relayed streams never share a connection with another's.
	s, own, err := r.dial(dctx, m.Source, http.Header{headerRelaySession: {r.id}, headerRelayMeta: {string(meta)}})
	if err != nil {
		return nil, &tunnel.OpenError{Peer: own, Err: err}
	}
	return s, nil
}

// End asks the replica holding the session to end it (session.Ender), by who asked, within ctx.
func (r relayOpener) End(ctx context.Context, by string) error {
	s, _, err := r.dial(ctx, "", http.Header{headerRelaySession: {r.id}, headerRelayEnd: {by}})
	if err != nil {
		return err
	}
	defer s.Close()
	if deadline, ok := ctx.Deadline(); ok {
		s.SetReadDeadline(deadline)
	}
	var reply tunnel.Reply
	if err := tunnel.ReadMsg(s, &reply); err != nil {
		return fmt.Errorf("replica %s did not answer: %w", r.addr, err)
	}
	if !reply.OK {
		return fmt.Errorf("replica %s: %s", r.addr, reply.Error)
	}
	return nil
}

// dial opens a relay stream to the replica with the waypoint's own identity.
func (r relayOpener) dial(ctx context.Context, tenant string, h http.Header) (*hbone.Stream, spiffeid.ID, error) {
	own, _ := r.h.Identity.Identity()
	if own == nil {
		return nil, spiffeid.ID{}, identity.ErrNoIdentity
	}
	tlsCfg, err := r.h.clientTLS(own.SVID.ID)
	if err != nil {
		return nil, spiffeid.ID{}, err
	}
	s, err := r.h.Dialer.Dial(ctx, r.addr, RelayTarget, hbone.DialOptions{TLSConfig: tlsCfg, ServerID: own.SVID.ID.String(),
		LocalID: own.SVID.ID.String(), Tenant: tenant, Header: h})
	if err != nil {
		return nil, own.SVID.ID, fmt.Errorf("relaying to replica %s: %w", r.addr, err)
	}
	return s, own.SVID.ID, nil
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
	if by := req.Header.Get(headerRelayEnd); by != "" {
		return h.serveRelayEnd(s, req.Header.Get(headerRelaySession), by)
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

// serveRelayEnd ends the local session id for another replica, which authorized the request (by
// asked), and answers once it is released.
func (h *Handler) serveRelayEnd(s *hbone.Stream, id, by string) error {
	st := h.Sessions.Get(id)
	if st == nil || st.Remote {
		return fmt.Errorf("waypoint: %w: no local session %q", hbone.ErrUnavailable, id)
	}
	if err := s.Accept(); err != nil {
		return err
	}
	reply := tunnel.Reply{OK: true, Session: id}
	if err := st.EndOnRequest(by); err != nil {
		reply = tunnel.Reply{Error: err.Error()}
	}
	s.SetWriteDeadline(time.Now().Add(DefaultConnectTimeout))
	err := tunnel.WriteMsg(s, reply)
	s.CloseWrite()
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
