package session

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// endWait bounds each wait of ending a session on request: for its CLI to read the EventEnded
// and hang up, and for the session and all it holds (its binding, its DebugSession) to be
// released before `detour sessions end` is answered.
const endWait = 5 * time.Second

// kill is a lease's end on request (`detour sessions end`): closed once, with the reason the
// session's CLI is told.
type kill struct {
	once   sync.Once
	c      chan struct{}
	reason string
}

func newKill() *kill { return &kill{c: make(chan struct{})} }

func (k *kill) do(reason string) {
	k.once.Do(func() {
		k.reason = reason
		close(k.c)
	})
}

func (k *kill) done() bool {
	select {
	case <-k.c:
		return true
	default:
		return false
	}
}

// end ends the local session id for p, which must be its holder or hold a grant (END, or the
// session's own STEAL or MIRROR) on its service port; it returns once the session is released
// (or endWait has passed). A session p may not even see is reported as unknown, as an unknown ID.
func (m *Manager) end(p *tunnel.Peer, id string) error {
	if !validID(id) {
		return fmt.Errorf("session: %q is not a session ID (12 hex digits, as `detour sessions` lists them)", id)
	}
	unknown := fmt.Errorf("session: no session %s on this waypoint (`detour sessions` lists the ones you may see)", id)
	s := m.Registry.Get(id)
	if s == nil {
		return unknown
	}
	principal := authz.Principal(p.ID().String())
	if s.Holder != p.ID() && !m.mayEnd(principal, s) {
		if m.Policies == nil || !m.mayList(m.Policies(), principal, s) {
			return unknown
		}
		method := strings.ToUpper(string(s.Spec.Mode))
		return fmt.Errorf("session: ending session %s refused for %s: only its developer (%s) or a principal granted END or %s on %s port %d may. A policy that would grant it:\n%s",
			id, principal, s.Holder, method, s.Host, s.Spec.Port, m.suggest(principal, "END", s.Host, fmt.Sprintf("/ports/%d", s.Spec.Port)))
	}
	who := "its developer"
	if s.Holder != p.ID() {
		who = string(principal)
	}
	if s.Remote {
		return m.endRemote(s, who)
	}
	if err := m.endLocal(id, who); err != nil {
		if errors.Is(err, errNotHere) {
			return unknown
		}
		return err
	}
	m.log().Info("session: ended on request", "session", id, "by", p.ID().String())
	return nil
}

// errNotHere: the session has no lease on this replica (gone, or held elsewhere).
var errNotHere = errors.New("session: no such session held by this replica")

// endLocal ends the session id this replica holds, its CLI told it was ended by who, and returns
// once it is released (or 2·endWait has passed).
func (m *Manager) endLocal(id, who string) error {
	l := m.lease(id)
	if l == nil {
		return errNotHere
	}
	l.kill.do("ended by " + who + " (detour sessions end)")
	timer := time.NewTimer(2 * endWait)
	defer timer.Stop()
	select {
	case <-l.gone:
		return nil
	case <-timer.C:
		return fmt.Errorf("session: session %s is ending but not yet released after %v; `detour sessions` shows when it is gone", id, 2*endWait)
	}
}

// Ender is an Opener that can also end, at the replica holding it, the remote session whose
// streams it relays there (the waypoint's relay to another replica).
type Ender interface {
	End(ctx context.Context, by string) error
}

// endRemote asks the replica holding remote session s to end it (this replica authorized the
// request), and returns once that replica released it.
func (m *Manager) endRemote(s *Session, who string) error {
	var e Ender
	if ref := s.peer.Load(); ref != nil {
		e, _ = ref.Opener.(Ender)
	}
	if e == nil {
		return fmt.Errorf("session: session %s is held by another waypoint replica, which alone can end it; retry (a new connection may reach that replica), or port-forward to it", s.ID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*endWait) // the holder waits 2·endWait at most
	defer cancel()
	if err := e.End(ctx, who); err != nil {
		return fmt.Errorf("session: session %s is held by another waypoint replica, which did not end it: %v; retry, or port-forward to that replica", s.ID, err)
	}
	m.log().Info("session: ended on request by the replica holding it", "session", s.ID, "by", who)
	return nil
}

// EndOnRequest ends this local session as `detour sessions end` does, for a request another
// replica relayed here: that replica authorized it, and by is who asked, for the CLI's message.
// It returns once the session is released.
func (s *Session) EndOnRequest(by string) error {
	if s.Remote || s.endOnRequest == nil {
		return fmt.Errorf("session: session %s is not held by this replica", s.ID)
	}
	return s.endOnRequest(by)
}

// mayEnd: principal holds END, or the method of the session's own mode, on its service port.
func (m *Manager) mayEnd(principal string, s *Session) bool {
	if m.Policies == nil {
		return false
	}
	e := m.Policies()
	for _, method := range []string{"END", strings.ToUpper(string(s.Spec.Mode))} {
		dec := e.Grant(&authz.Request{
			Principal: principal,
			Service:   authz.Service{Namespace: s.Spec.Namespace, Name: s.Spec.Service},
			DestPort:  s.Spec.Port,
			HTTP:      &authz.HTTPRequest{Method: method, Host: s.Host, Path: fmt.Sprintf("/ports/%d", s.Spec.Port)},
		})
		if dec.Allow {
			return true
		}
	}
	return false
}
