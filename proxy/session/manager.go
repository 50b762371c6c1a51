package session

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// helloTimeout bounds the wait for a tunnel's Hello.
const helloTimeout = 10 * time.Second

// Manager serves developer tunnels: one Hello per tunnel, answered, then (for a registration)
// the session lives until the tunnel goes.
type Manager struct {
	Registry *Registry
	Routes   func() *route.Table
	Policies func() *authz.Engine // nil: every registration is refused (deny by default)
	// Gateway names the waypoint, for the policy a refusal suggests.
	Namespace, Gateway string
	Logger             *slog.Logger     // nil means slog.Default()
	Metrics            *metrics.Metrics // nil records nothing
	// Check, if set, refuses specs this server cannot serve (before authorization).
	Check func(tunnel.Spec) error
	// Publisher, if set, makes local sessions visible to the other replicas while they live.
	Publisher interface {
		Publish(*Session) (unpublish func())
	}
	// Egress serves the developer's egress link (HBONE with the developer's SVID, over the
	// tunnel): the waypoint's handler and server TLS. Nil Handler refuses egress.
	Egress struct {
		Handler hbone.Handler
		TLS     *tls.Config
	}
	// Bind, if set, binds an unbound service to this waypoint for a session that asks
	// (Spec.Bind); release reverts it. session is the session's ID: a session resumed here from
	// another replica takes over its binding. Nil: such sessions are refused.
	Bind func(ctx context.Context, namespace, service, session string) (release func(), err error)
	// CheckBind, if set, is asked before Bind for a session without Spec.Force: an error (the
	// Istio config detour does not implement that would apply to the service once bound)
	// refuses the session, nothing bound.
	CheckBind func(namespace, service string) error
	// Grace is the longest a session outlives its lost tunnel, detached (its traffic goes to the
	// real service), waiting for its CLI to re-register it (tunnel.Hello.Resume); a CLI may ask
	// for less. 0 means DefaultGrace; negative: sessions end with their tunnel. Only CLIs that
	// announce tunnel.CapResume get one.
	Grace time.Duration
	// Version is this waypoint's detour version, sent in every Reply and named in version-skew
	// refusals.
	Version string

	mu     sync.Mutex
	leases map[string]*lease // the local sessions, by ID, until all they hold is released
}

// ServeTunnel is a tunnel.Server Handler.
func (m *Manager) ServeTunnel(p *tunnel.Peer) {
	ctl := p.Control()
	ctl.SetReadDeadline(time.Now().Add(helloTimeout))
	hello, err := tunnel.ReadHello(ctl)
	if se := (*tunnel.SkewError)(nil); errors.As(err, &se) {
		m.log().Info("session: refused: version skew", "developer", p.ID().String(), "cli", se.Version, "protocol", se.Protocol, "err", err)
		lastWord(ctl, m.reply(tunnel.Reply{Error: fmt.Sprintf("version skew: this waypoint runs detour %s (tunnel protocol %d) and cannot read the request of a CLI running detour %s (tunnel protocol %d): %v; use a CLI of the waypoint's version, or upgrade the waypoint",
			m.version(), tunnel.Protocol, orUnknown(se.Version), se.Protocol, se.Err)}, se.Protocol, 0))
		return
	}
	if errors.Is(err, tunnel.ErrTooLarge) {
		m.log().Info("session: refused", "developer", p.ID().String(), "err", err)
		lastWord(ctl, tunnel.Reply{Error: fmt.Sprintf("session: the registration is larger than %d bytes: shorten its filter (regexes of at most %d bytes)", tunnel.MaxHello, MaxRegex)})
		return
	}
	if err != nil {
		m.log().Info("session: no hello", "developer", p.ID().String(), "err", err)
		return
	}
	ctl.SetReadDeadline(time.Time{})
	switch {
	case hello.List:
		sessions := m.visible(p)
		slices.SortFunc(sessions, func(a, b tunnel.SessionInfo) int { return a.Since.Compare(b.Since) })
		lastWord(ctl, tunnel.Reply{OK: true, Sessions: sessions})
		return
	case hello.End != "":
		if err := m.end(p, hello.End); err != nil {
			m.log().Info("session: end refused", "session", hello.End, "by", p.ID().String(), "err", err)
			lastWord(ctl, tunnel.Reply{Error: err.Error()})
			return
		}
		lastWord(ctl, tunnel.Reply{OK: true, Session: hello.End})
		return
	case hello.Register == nil && !hello.Egress:
		lastWord(ctl, tunnel.Reply{Error: "a hello must register a session, ask for egress, list sessions, or end one"})
		return
	case hello.Egress && m.Egress.Handler == nil:
		lastWord(ctl, tunnel.Reply{Error: "this waypoint offers no egress"})
		return
	}
	var as spiffeid.ID
	if hello.AsTarget != nil {
		id, err := m.impersonate(p, *hello.AsTarget)
		if err != nil {
			m.log().Info("session: refused", "developer", p.ID().String(), "err", err)
			lastWord(ctl, tunnel.Reply{Error: err.Error()})
			return
		}
		as = id
	}
	// The egress link (if asked for) lives until the tunnel goes or this handler returns, and is
	// waited for before it does.
	ctx, stop := tunnelContext(p)
	var egress sync.WaitGroup
	defer func() {
		stop()
		egress.Wait()
	}()
	if hello.Register == nil { // egress only
		if err := tunnel.WriteMsg(ctl, tunnel.Reply{OK: true}); err != nil {
			return
		}
		egress.Go(func() { m.egress(ctx, p, as) })
		io.Copy(io.Discard, ctl) // until the CLI hangs up or the tunnel dies
		return
	}
	if hello.Resume != "" {
		attached := func() {
			if hello.Egress {
				egress.Go(func() { m.egress(ctx, p, as) })
			}
		}
		if m.resume(p, ctl, hello, attached) {
			return
		}
	}
	s, err := m.register(p, *hello.Register, hello.Resume)
	if err != nil {
		m.log().Info("session: refused", "developer", p.ID().String(), "err", err)
		lastWord(ctl, tunnel.Reply{Error: err.Error()})
		return
	}
	l := m.newLease(s, m.graceFor(hello))
	defer m.dropLease(l) // last: once the session and all it holds are released
	defer m.Registry.Remove(s)
	if s.Spec.Bind {
		if m.Bind == nil {
			lastWord(ctl, tunnel.Reply{Error: "this waypoint cannot bind services (no Kubernetes discovery)"})
			return
		}
		if m.CheckBind != nil && !s.Spec.Force {
			if err := m.CheckBind(s.Spec.Namespace, s.Spec.Service); err != nil {
				m.log().Info("session: refused", "developer", p.ID().String(), "err", err)
				lastWord(ctl, tunnel.Reply{Error: err.Error()})
				return
			}
		}
		release, err := m.Bind(context.Background(), s.Spec.Namespace, s.Spec.Service, s.ID)
		if err != nil {
			m.log().Info("session: refused", "developer", p.ID().String(), "err", err)
			lastWord(ctl, tunnel.Reply{Error: err.Error()})
			return
		}
		defer release()
	}
	if m.Publisher != nil {
		defer m.Publisher.Publish(s)()
	}
	m.Metrics.SessionStarted(string(s.Spec.Mode))
	defer m.Metrics.SessionEnded(string(s.Spec.Mode))
	if err := tunnel.WriteMsg(ctl, m.reply(tunnel.Reply{OK: true, Session: s.ID}, hello.Protocol, l.grace)); err != nil {
		l.end()
		return
	}
	if hello.Egress {
		egress.Go(func() { m.egress(ctx, p, as) })
	}
	m.log().Info("session: started", "session", s.ID, "developer", p.ID().String(), "mode", s.Spec.Mode,
		"service", s.Host, "port", s.Spec.Port, "filter", describe(s.Spec.Filter), "transport", p.Transport(),
		"cli", hello.Version, "grace", l.grace)
	m.hold(l, p, ctl)
}

// reply is r with the waypoint's side of the version exchange, for a CLI of protocol proto (the
// fields go only to a CLI that sent its own: an older one refuses fields it does not know); grace
// is the session's.
func (m *Manager) reply(r tunnel.Reply, proto int, grace time.Duration) tunnel.Reply {
	if proto < 2 {
		return r
	}
	r.Version, r.Protocol = m.version(), tunnel.Protocol
	if m.Grace >= 0 {
		r.Capabilities = []string{tunnel.CapResume}
	}
	r.GraceSeconds = int(grace / time.Second)
	return r
}

func (m *Manager) version() string { return orUnknown(m.Version) }

func orUnknown(v string) string {
	if v == "" {
		return "(unknown version)"
	}
	return v
}

// egress opens the developer's egress link and serves HBONE on it with the waypoint's handler:
// the developer's (or, with as, the impersonated workload's) identity is the streams' source.
func (m *Manager) egress(ctx context.Context, p *tunnel.Peer, as spiffeid.ID) {
	c, err := p.Open(ctx, tunnel.Meta{Kind: tunnel.KindHBONE})
	if err != nil {
		return
	}
	h := hbone.HandlerFunc(func(s *hbone.Stream) error {
		if s.Request().Target.Host == RelayHost {
			return fmt.Errorf("session: %w: the egress link opens no relays between replicas", hbone.ErrForbidden)
		}
		if !as.IsZero() {
			s.Request().PeerID = as
		}
		return m.Egress.Handler.ServeHBONE(s)
	})
	srv := &hbone.Server{Handler: h, TLSConfig: m.Egress.TLS, Logger: m.log()}
	srv.ServeConn(ctx, c)
}

// impersonate authorizes IMPERSONATE on t and returns the identity of t's workload.
func (m *Manager) impersonate(p *tunnel.Peer, t tunnel.Target) (spiffeid.ID, error) {
	svc := m.Routes().Service(t.Namespace, t.Service)
	if svc == nil {
		return spiffeid.ID{}, fmt.Errorf("session: service %s/%s is not known to this waypoint", t.Namespace, t.Service)
	}
	sa := ""
	for _, e := range svc.Endpoints {
		if e.ServiceAccount != "" {
			sa = e.ServiceAccount
			break
		}
	}
	if sa == "" {
		return spiffeid.ID{}, fmt.Errorf("session: service %s/%s has no endpoint with a known service account to impersonate", t.Namespace, t.Service)
	}
	id, err := spiffeid.FromSegments(p.ID().TrustDomain(), "ns", svc.Namespace, "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("session: service %s/%s: %w", t.Namespace, t.Service, err)
	}
	if id == p.Local() || p.Local().IsZero() {
		return spiffeid.ID{}, fmt.Errorf("session: IMPERSONATE of %s refused: its workloads run as this waypoint's own identity (%s), which no grant hands out; impersonate the service you debug instead", svc.Hostname, id)
	}
	principal := authz.Principal(p.ID().String())
	var dec authz.Decision
	if m.Policies != nil {
		dec = m.Policies().Grant(&authz.Request{Principal: principal, Service: authz.Service{Namespace: svc.Namespace, Name: svc.Name},
			HTTP: &authz.HTTPRequest{Method: "IMPERSONATE", Host: svc.Hostname, Path: "/"}})
	}
	if !dec.Allow {
		return spiffeid.ID{}, fmt.Errorf("IMPERSONATE of %s refused for %s: %s. A policy that would grant it:\n%s",
			svc.Hostname, principal, dec.Reason, m.suggest(principal, "IMPERSONATE", svc.Hostname, "/"))
	}
	return id, nil
}

// visible is what `list` shows p: its own sessions, and others' on service ports it holds a grant
// on (LIST, or the STEAL or MIRROR that would let it take the same traffic).
func (m *Manager) visible(p *tunnel.Peer) []tunnel.SessionInfo {
	var out []tunnel.SessionInfo
	principal := authz.Principal(p.ID().String())
	for _, s := range m.Registry.Sessions() {
		if s.Holder == p.ID() || m.Policies != nil && m.mayList(m.Policies(), principal, s) {
			out = append(out, s.Info())
		}
	}
	return out
}

func (m *Manager) mayList(e *authz.Engine, principal string, s *Session) bool {
	for _, method := range []string{"LIST", "STEAL", "MIRROR"} {
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

// tunnelContext is a context that ends with the tunnel, or with stop, which also waits for the
// watcher it started.
func tunnelContext(p *tunnel.Peer) (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-p.Done():
		case <-ctx.Done():
		}
		cancel()
	}()
	return ctx, func() {
		cancel()
		<-done
	}
}

// lastWord sends the final reply and lets the CLI read it before the tunnel closes: half-close,
// then wait (bounded) for the CLI to hang up.
func lastWord(ctl net.Conn, r tunnel.Reply) {
	if err := tunnel.WriteMsg(ctl, r); err != nil {
		return
	}
	if cw, ok := ctl.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	ctl.SetReadDeadline(time.Now().Add(helloTimeout))
	io.Copy(io.Discard, ctl)
}

// register validates, authorizes and registers spec, under id when the CLI re-registers a session
// no replica holds any more ("": a new ID). Nothing proportional to the spec's size (its filter's
// regexes) is done before the policy said yes.
func (m *Manager) register(p *tunnel.Peer, spec tunnel.Spec, id string) (*Session, error) {
	if id != "" && !validID(id) {
		return nil, fmt.Errorf("session: %q is not a session ID", id)
	}
	svc, spec, err := m.authorize(p, spec)
	if err != nil {
		return nil, err
	}
	s, err := New(spec, svc.Hostname, p.ID(), p) // compiles the filter's (bounded) regexes
	if err != nil {
		return nil, err
	}
	if id != "" {
		s.ID = id
	}
	s.metrics = m.Metrics
	s.endOnRequest = func(by string) error {
		if err := m.endLocal(s.ID, by); err != nil {
			return err
		}
		m.log().Info("session: ended on request, relayed by another replica", "session", s.ID, "by", by)
		return nil
	}
	if err := m.Registry.Add(s); err != nil {
		if !m.replaceWaiting(err, s) {
			return nil, err
		}
		if err := m.Registry.Add(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// replaceWaiting ends the session err says s conflicts with when it is s's developer's own,
// waiting for a resume (the developer started a new CLI instead), and reports whether it ended.
func (m *Manager) replaceWaiting(err error, s *Session) bool {
	var ce *ConflictError
	if !errors.As(err, &ce) || ce.With.Holder != s.Holder || ce.With.Remote || ce.With.Attached() {
		return false
	}
	l := m.lease(ce.With.ID)
	if l == nil {
		return false
	}
	m.log().Info("session: a new registration of its developer replaces a session waiting for a resume", "session", l.s.ID, "by", s.ID)
	l.s.Yield()
	timer := time.NewTimer(resumeWait)
	defer timer.Stop()
	select {
	case <-l.gone:
		return true
	case <-timer.C:
		return false
	}
}

// authorize validates spec and asks the policies whether p may hold it; spec comes back with its
// port resolved.
func (m *Manager) authorize(p *tunnel.Peer, spec tunnel.Spec) (*route.Service, tunnel.Spec, error) {
	svc, port, err := m.find(spec)
	if err != nil {
		return nil, spec, err
	}
	spec.Port = port
	if spec.Mode != Steal && spec.Mode != Mirror {
		return nil, spec, fmt.Errorf("session: mode %q is not steal or mirror", spec.Mode)
	}
	if m.Check != nil {
		if err := m.Check(spec); err != nil {
			return nil, spec, err
		}
	}
	method := strings.ToUpper(string(spec.Mode))
	path := fmt.Sprintf("/ports/%d", port)
	principal := authz.Principal(p.ID().String())
	var dec authz.Decision
	if m.Policies != nil {
		dec = m.Policies().Grant(&authz.Request{
			Principal: principal,
			Service:   authz.Service{Namespace: svc.Namespace, Name: svc.Name},
			DestPort:  port,
			HTTP:      &authz.HTTPRequest{Method: method, Host: svc.Hostname, Path: path},
		})
	} else {
		dec.Reason = "this waypoint has no AuthorizationPolicy source"
	}
	if !dec.Allow {
		return nil, spec, fmt.Errorf("%s on %s port %d refused for %s: %s. A policy that would grant it:\n%s",
			method, svc.Hostname, port, principal, dec.Reason, m.suggest(principal, method, svc.Hostname, path))
	}
	return svc, spec, nil
}

// find resolves the spec's service and port.
func (m *Manager) find(spec tunnel.Spec) (*route.Service, uint16, error) {
	if spec.Namespace == "" || spec.Service == "" {
		return nil, 0, errors.New("session: the target needs a namespace and a service")
	}
	svc := m.Routes().Service(spec.Namespace, spec.Service)
	if svc == nil {
		return nil, 0, fmt.Errorf("session: service %s/%s is not known to this waypoint", spec.Namespace, spec.Service)
	}
	if spec.Port == 0 {
		if len(svc.Ports) != 1 {
			return nil, 0, fmt.Errorf("session: service %s/%s has %d ports; name one", spec.Namespace, spec.Service, len(svc.Ports))
		}
		return svc, svc.Ports[0].Port, nil
	}
	for _, p := range svc.Ports {
		if p.Port == spec.Port {
			return svc, p.Port, nil
		}
	}
	return nil, 0, fmt.Errorf("session: service %s/%s has no port %d", spec.Namespace, spec.Service, spec.Port)
}

// suggest writes the AuthorizationPolicy that would grant the request.
func (m *Manager) suggest(principal, method, host, path string) string {
	name := "detour-" + strings.ToLower(method) + "-" + lastSegment(principal)
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: %s, namespace: %s}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: %s}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [%q]}}]
    to: [{operation: {methods: [%s], hosts: [%q], paths: [%q]}}]`, name, m.Namespace, m.Gateway, principal, method, host, path)
}

func lastSegment(s string) string {
	if i := strings.LastIndexByte(s, '/'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func (m *Manager) log() *slog.Logger {
	if m.Logger != nil {
		return m.Logger
	}
	return slog.Default()
}
