package session

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Resuming: a session registered by a CLI that announced tunnel.CapResume outlives its tunnel by
// its grace period. While its tunnel is down the session is detached (Session.Detach): its
// matched traffic goes to the real service at once. A Resume of its ID by the same developer with
// the same spec, authorized again, re-attaches it to the new tunnel; past the grace period it
// ends (its binding released, its DebugSession deleted) as a session whose tunnel closed does.
//
// The goroutine that registered the session owns it for its whole life (hold), across tunnels:
// a Resume, served by the new tunnel's goroutine, hands that tunnel over (lease.next) and waits
// until the owner is done with it.

// DefaultGrace is Manager.Grace's default.
const DefaultGrace = 30 * time.Second

// MaxGrace bounds the grace period a configuration may give.
const MaxGrace = 10 * time.Minute

// resumeWait bounds how long a Resume waits for the session's owner to take its tunnel (the owner
// may be writing an event to the tunnel that was just lost).
const resumeWait = 10 * time.Second

// lease is one local session's life across its developer's tunnels; owned by hold.
type lease struct {
	s     *Session
	grace time.Duration    // owned by hold
	next  chan *attachment // a Resume's tunnel, received by hold only
	ended chan struct{}    // closed when hold stops taking tunnels
	gone  chan struct{}    // closed once the session and all it holds are released
	cur   *attachment      // the Resume's tunnel in use (nil: the registering one); owned by hold, then dropLease
	kill  *kill            // `detour sessions end`
	once  sync.Once
}

func (l *lease) end() { l.once.Do(func() { close(l.ended) }) }

// attachment is a Resume's tunnel, handed to the session's owner.
type attachment struct {
	p     *tunnel.Peer
	ctl   net.Conn
	grace time.Duration
	proto int           // the CLI's tunnel protocol
	done  chan struct{} // closed when the owner no longer uses the tunnel
}

func (m *Manager) newLease(s *Session, grace time.Duration) *lease {
	l := &lease{s: s, grace: grace, next: make(chan *attachment), ended: make(chan struct{}), gone: make(chan struct{}),
		kill: newKill()}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.leases == nil {
		m.leases = map[string]*lease{}
	}
	m.leases[s.ID] = l
	return l
}

func (m *Manager) dropLease(l *lease) {
	l.end()
	if l.cur != nil {
		close(l.cur.done) // now that the session is gone, its last tunnel may close
	}
	m.mu.Lock()
	if m.leases[l.s.ID] == l {
		delete(m.leases, l.s.ID)
	}
	m.mu.Unlock()
	close(l.gone)
}

func (m *Manager) lease(id string) *lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.leases[id]
}

// graceFor is how long a session registered with h outlives its tunnel.
func (m *Manager) graceFor(h tunnel.Hello) time.Duration {
	if !h.Has(tunnel.CapResume) || m.Grace < 0 {
		return 0
	}
	g := m.Grace
	if g == 0 {
		g = DefaultGrace
	}
	if h.GraceSeconds > 0 {
		g = min(g, time.Duration(h.GraceSeconds)*time.Second)
	}
	return g
}

// validID reports whether id has the form of the IDs New makes (12 lower-case hex digits).
func validID(id string) bool {
	if len(id) != 12 {
		return false
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// resume serves a Resume of a session this replica holds: checked (same developer, same spec,
// authorized again) and handed to the session's owner, then attached() is called and resume
// waits until the owner is done with p. False when there is no such session (any more): the
// caller registers it anew under its ID.
func (m *Manager) resume(p *tunnel.Peer, ctl net.Conn, hello tunnel.Hello, attached func()) bool {
	l := m.lease(hello.Resume)
	if l == nil {
		return false
	}
	refuse := func(err error) bool {
		m.log().Info("session: resume refused", "session", hello.Resume, "developer", p.ID().String(), "err", err)
		lastWord(ctl, m.reply(tunnel.Reply{Error: err.Error()}, hello.Protocol, 0))
		return true
	}
	if l.s.Holder != p.ID() {
		return refuse(fmt.Errorf("session: session %s is held by another developer", hello.Resume))
	}
	if hello.Register == nil {
		return refuse(errors.New("session: a resume must repeat the session's registration"))
	}
	_, spec, err := m.authorize(p, *hello.Register)
	if err != nil {
		return refuse(err)
	}
	if !spec.Equal(l.s.Spec) {
		return refuse(fmt.Errorf("session: session %s was registered for %s port %d, %s (%s); this resume asks for %s/%s port %d, %s (%s)",
			hello.Resume, l.s.Host, l.s.Spec.Port, l.s.Spec.Mode, describe(l.s.Spec.Filter), spec.Namespace, spec.Service, spec.Port, spec.Mode, describe(spec.Filter)))
	}
	a := &attachment{p: p, ctl: ctl, grace: m.graceFor(hello), proto: hello.Protocol, done: make(chan struct{})}
	timer := time.NewTimer(resumeWait)
	defer timer.Stop()
	select {
	case l.next <- a:
	case <-l.ended: // ending: once released, it is registered anew under its ID
		select {
		case <-l.gone:
			return false
		case <-timer.C:
			return refuse(fmt.Errorf("session: session %s is ending%s", hello.Resume, tunnel.Retry))
		}
	case <-p.Done():
		return true
	case <-timer.C:
		return refuse(fmt.Errorf("session: session %s is busy%s", hello.Resume, tunnel.Retry))
	}
	attached()
	select {
	case <-a.done:
	case <-p.Done():
	}
	return true
}

// hold serves the session's control stream on its tunnel; when the tunnel is lost it keeps the
// session detached for its grace period, waiting for a Resume, and carries on over the Resume's
// tunnel. It returns when the session ends: the developer ended it, or no Resume came in time.
func (m *Manager) hold(l *lease, p *tunnel.Peer, ctl net.Conn) {
	stopping := p.Stopping() // the server's: every peer's is the same
	defer l.end()
	for {
		a, ended := m.serveControl(l, p, ctl)
		if l.kill.done() {
			l.s.Detach()
			return // logged by end
		}
		if ended {
			m.log().Info("session: ended by the developer", "session", l.s.ID)
			return
		}
		if a == nil {
			l.s.Detach()
			if l.grace <= 0 {
				m.log().Info("session: tunnel lost", "session", l.s.ID)
				return
			}
			m.log().Info("session: tunnel lost; waiting for the developer to resume it", "session", l.s.ID, "grace", l.grace)
			timer := time.NewTimer(l.grace)
			select {
			case a = <-l.next:
				timer.Stop()
			case <-timer.C:
				m.log().Info("session: not resumed within its grace period; ended", "session", l.s.ID, "grace", l.grace)
				return
			case <-stopping:
				timer.Stop()
				return
			case <-l.s.yield:
				timer.Stop()
				m.log().Info("session: resumed on another replica; ended here", "session", l.s.ID)
				return
			case <-l.kill.c:
				timer.Stop()
				return
			}
		}
		if l.cur != nil {
			close(l.cur.done)
		}
		l.cur, p, ctl, l.grace = a, a.p, a.ctl, a.grace
		l.s.Attach(p)
		if err := tunnel.WriteMsg(ctl, m.reply(tunnel.Reply{OK: true, Session: l.s.ID}, a.proto, l.grace)); err != nil {
			continue // lost again: serveControl sees it
		}
		m.log().Info("session: resumed", "session", l.s.ID, "developer", p.ID().String(), "transport", p.Transport())
	}
}

// serveControl writes the session's events to ctl until the developer ends the session (its EOF:
// ended), the tunnel is lost (nil, false), or a Resume brings another tunnel (a). Unless ended, the
// tunnel is closed when it returns (the developer's side of a moved session is stale); an ended
// session's tunnel closes once the session is removed, so that the CLI's exit means it is gone.
func (m *Manager) serveControl(l *lease, p *tunnel.Peer, ctl net.Conn) (a *attachment, ended bool) {
	// The CLI sends nothing more: its EOF (Ctrl-C) ends the session; a read error is a lost tunnel.
	gone := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, ctl)
		gone <- err
	}()
	defer func() {
		if ended {
			return // the read above is over (its EOF)
		}
		p.Close()
		if gone != nil {
			<-gone
		}
	}()
	for {
		select {
		case ev := <-l.s.events:
			if err := tunnel.WriteMsg(ctl, ev); err != nil {
				return nil, false
			}
		case err := <-gone:
			gone = nil
			return nil, err == nil
		case <-p.Done():
			return nil, false
		case a := <-l.next:
			return a, false
		case <-l.kill.c:
			// Tell the CLI (it does not re-register an ended session) and give it a moment to
			// hang up before the tunnel is closed.
			ctl.SetWriteDeadline(time.Now().Add(endWait))
			if tunnel.WriteMsg(ctl, tunnel.Event{Kind: tunnel.EventEnded, Error: l.kill.reason}) == nil {
				timer := time.NewTimer(endWait)
				select {
				case <-gone:
					gone = nil
				case <-p.Done():
				case <-timer.C:
				}
				timer.Stop()
			}
			return nil, false
		}
	}
}
