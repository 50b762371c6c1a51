package session

import (
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
	if s.Remote {
		return fmt.Errorf("session: session %s is held by another waypoint replica, which alone can end it; retry (a new connection may reach that replica), or port-forward to it", id)
	}
	l := m.lease(id)
	if l == nil {
		return unknown
	}
	who := "its developer"
	if s.Holder != p.ID() {
		who = string(principal)
	}
	l.kill.do("ended by " + who + " (detour sessions end)")
	timer := time.NewTimer(2 * endWait)
	defer timer.Stop()
	select {
	case <-l.gone:
		m.log().Info("session: ended on request", "session", id, "by", p.ID().String())
		return nil
	case <-timer.C:
		return fmt.Errorf("session: session %s is ending but not yet released after %v; `detour sessions` shows when it is gone", id, 2*endWait)
	}
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
