// Package session holds debug sessions: a developer's request, through a tunnel, to steal or
// mirror a service's traffic (whole streams, or HTTP requests that match a filter). The Registry
// refuses overlapping steals and is read lock-free by the data path; the Manager serves each
// tunnel: it authorizes the registration with AuthorizationPolicy (deny by default), registers
// the session for the tunnel's life and reports what the session took.
package session

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"regexp/syntax"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Modes (the tunnel's).
const (
	Steal  = tunnel.ModeSteal
	Mirror = tunnel.ModeMirror
)

// RelayHost is the authority's host of a stream one replica relays to another (the holder of the
// session's tunnel); the waypoint's handler accepts it only from the waypoint's own identity.
const RelayHost = "relay.detour.internal"

// Bounds on what a session may hold.
const (
	// MaxMirrorBody is the largest request body copied to a mirror; a larger request is not
	// mirrored (counted as dropped).
	MaxMirrorBody = 1 << 20
	// MaxMirrorInFlight bounds a session's mirror copies in flight (requests, and whole streams:
	// each holds one goroutine or two, and one tunnel stream); past it, copies are dropped
	// (counted), never queued: the real path is never slowed.
	MaxMirrorInFlight = 32
	// MaxMirrorPerDeveloper bounds the same across all of one developer's sessions.
	MaxMirrorPerDeveloper = 64
	// MaxRegex bounds a filter's regex, in bytes of pattern and in instructions once compiled
	// (repetitions multiply: `a{1000}` is a thousand). Go's regexp matches in linear time, but its
	// compiled program grows with every repetition: an 18 KiB pattern of `a{1000}` costs 560 MB.
	MaxRegex     = 1 << 10
	MaxRegexInst = 10_000
	// eventQueue bounds events waiting for the control stream; past it, events are dropped.
	eventQueue = 256
)

// Opener opens data streams to the developer (a *tunnel.Peer).
type Opener interface {
	Open(ctx context.Context, m tunnel.Meta) (net.Conn, error)
}

// Session is one registered session. Immutable after New except for its counters.
type Session struct {
	ID     string
	Holder spiffeid.ID
	// Remote: the developer's tunnel is held by another replica; streams are relayed there.
	Remote bool
	Spec   tunnel.Spec // Port resolved (never 0)
	Host   string      // the service's hostname
	Since  time.Time

	peer    atomic.Pointer[peerRef] // nil: detached, its tunnel lost (waiting for a Resume)
	metrics *metrics.Metrics        // nil records nothing
	headers []headerCond            // the filter's header conditions, all to hold
	path    *regexp.Regexp

	streams, requests, dropped atomic.Int64
	mirrors                    chan struct{} // semaphore: mirror copies in flight
	developer                  *budget       // the holder's share, across its sessions; set by Registry.Add
	events                     chan tunnel.Event

	// ctx ends with the session (Registry.Remove); the goroutines started by Go watch it, and
	// Remove waits for them.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	alive alive // does the developer's side answer (probes)

	// endOnRequest ends a local session on another replica's relayed request (EndOnRequest);
	// set by the Manager before the session is added.
	endOnRequest func(by string) error

	yield     chan struct{} // closed by Yield
	yieldOnce sync.Once

	tmu    sync.Mutex
	h1, h2 *http.Transport
	closed bool // owned by tmu, with h1, h2 and wg.Add
}

// ConflictError: a steal overlaps another's (With).
type ConflictError struct {
	With *Session
	msg  string
}

func (e *ConflictError) Error() string { return e.msg }

// peerRef boxes an Opener for an atomic pointer.
type peerRef struct{ Opener }

// ErrDetached: the session's tunnel is lost and its developer has not re-registered it yet;
// matched traffic goes to the real service meanwhile.
var ErrDetached = errors.New("the developer's tunnel is down (waiting for the CLI to reconnect)")

// budget is a developer's mirror slots, shared by its sessions. Owned by the Registry's mutex
// (refs); slots is a semaphore.
type budget struct {
	slots chan struct{}
	refs  int
}

// New builds a session for spec (validated: mode, regexes) held by holder through peer.
func New(spec tunnel.Spec, host string, holder spiffeid.ID, peer Opener) (*Session, error) {
	if spec.Mode != Steal && spec.Mode != Mirror {
		return nil, fmt.Errorf("session: mode %q is not steal or mirror", spec.Mode)
	}
	f := spec.Filter
	s := &Session{Spec: spec, Host: host, Holder: holder, Since: time.Now(),
		mirrors: make(chan struct{}, MaxMirrorInFlight), events: make(chan tunnel.Event, eventQueue), yield: make(chan struct{})}
	s.peer.Store(&peerRef{peer})
	s.ctx, s.cancel = context.WithCancel(context.Background())
	var err error
	if s.headers, err = compileHeaders(f); err != nil {
		return nil, err
	}
	if f.Path != "" {
		if s.path, err = compile("path", f.Path); err != nil {
			return nil, err
		}
	}
	var id [6]byte
	rand.Read(id[:])
	s.ID = hex.EncodeToString(id[:])
	return s, nil
}

// compile compiles a filter's regex once it is known to be small: the pattern's length, then
// the size of its program as the parse tree says (parsing does not expand repetitions).
func compile(what, pattern string) (*regexp.Regexp, error) {
	if len(pattern) > MaxRegex {
		return nil, fmt.Errorf("session: the %s regex is %d bytes long, at most %d: shorten it", what, len(pattern), MaxRegex)
	}
	re, err := syntax.Parse(pattern, syntax.Perl)
	if err != nil {
		return nil, fmt.Errorf("session: %s regex: %w", what, err)
	}
	if progSize(re) > MaxRegexInst {
		return nil, fmt.Errorf("session: the %s regex expands to more than %d instructions: use fewer or smaller counted repetitions ({n})", what, MaxRegexInst)
	}
	return regexp.Compile(pattern)
}

// progSize estimates the instructions re compiles to, saturating just past MaxRegexInst.
func progSize(re *syntax.Regexp) int {
	n := 1
	switch re.Op {
	case syntax.OpLiteral:
		n = len(re.Rune)
	case syntax.OpCharClass:
		n = 1 + len(re.Rune)/2
	}
	for _, sub := range re.Sub {
		n += progSize(sub)
		if n > MaxRegexInst {
			return MaxRegexInst + 1
		}
	}
	if re.Op == syntax.OpRepeat {
		times := max(re.Max, re.Min, 1)
		if n > (MaxRegexInst+1)/times {
			return MaxRegexInst + 1
		}
		n *= times
	}
	return min(n, MaxRegexInst+1)
}

// NewRemote is a session another replica holds (learnt from the cluster); opener relays to it.
func NewRemote(id string, spec tunnel.Spec, host string, holder spiffeid.ID, opener Opener) (*Session, error) {
	s, err := New(spec, host, holder, opener)
	if err != nil {
		return nil, err
	}
	s.ID, s.Remote = id, true
	return s, nil
}

// Whole reports whether the session takes whole streams (no filter).
func (s *Session) Whole() bool { return s.Spec.Filter.IsZero() }

// Match reports whether an HTTP request matches the filter (a whole-stream session matches every
// request of an inspected stream).
func (s *Session) Match(r *http.Request, path string) bool {
	f := s.Spec.Filter
	if f.Method != "" && r.Method != f.Method {
		return false
	}
	if s.path != nil && !s.path.MatchString(path) {
		return false
	}
	for _, h := range s.headers {
		if !h.match(r.Header) {
			return false
		}
	}
	return true
}

// overlaps reports whether two steals could both match one request: only different exact values
// of the same header (in any of their header conditions) are known to be disjoint.
func overlaps(a, b tunnel.Filter) bool {
	for _, x := range a.HeaderMatches() {
		for _, y := range b.HeaderMatches() {
			if x.Value != "" && y.Value != "" && strings.EqualFold(x.Name, y.Name) && x.Value != y.Value {
				return false
			}
		}
	}
	return true
}

// Open opens a data stream to the developer for this session; while the session is detached it
// fails at once (a *tunnel.OpenError wrapping ErrDetached): nothing waits on a dead tunnel.
func (s *Session) Open(ctx context.Context, m tunnel.Meta) (net.Conn, error) {
	m.Session, m.Mode = s.ID, s.Spec.Mode
	ref := s.peer.Load()
	if ref == nil {
		return nil, &tunnel.OpenError{Peer: s.Holder, Err: ErrDetached}
	}
	c, err := ref.Open(ctx, m)
	if err == nil {
		s.reached()
	}
	return c, err
}

// Detach marks the session's tunnel lost: its traffic goes to the real service until Attach.
// Idle connections to the developer's app (over the lost tunnel) are dropped.
func (s *Session) Detach() {
	s.peer.Store(nil)
	s.closeIdle()
}

// Attach gives the session a new tunnel to its developer (a Resume).
func (s *Session) Attach(peer Opener) {
	s.closeIdle() // the old tunnel's
	s.alive.mu.Lock()
	s.alive.unreachable = false
	s.alive.mu.Unlock()
	s.peer.Store(&peerRef{peer})
}

// Yield tells a local session that another replica holds it now (its developer resumed it
// there): if it is waiting for a resume, it ends at once instead of at the end of its grace.
func (s *Session) Yield() { s.yieldOnce.Do(func() { close(s.yield) }) }

// Attached reports whether the session has a tunnel to its developer.
func (s *Session) Attached() bool { return s.peer.Load() != nil }

func (s *Session) closeIdle() {
	s.tmu.Lock()
	h1, h2 := s.h1, s.h2
	s.tmu.Unlock()
	for _, t := range []*http.Transport{h1, h2} {
		if t != nil {
			t.CloseIdleConnections()
		}
	}
}

// Transport sends HTTP requests to the developer's app: HTTP/1.1 or HTTP/2 prior knowledge, as
// the client spoke. Nil once the session ended.
func (s *Session) Transport(h2 bool) *http.Transport {
	s.tmu.Lock()
	defer s.tmu.Unlock()
	if s.closed {
		return nil
	}
	t := &s.h1
	if h2 {
		t = &s.h2
	}
	if *t == nil {
		var p http.Protocols
		proto := "http/1.1"
		if h2 {
			p.SetUnencryptedHTTP2(true)
			proto = "h2c"
		} else {
			p.SetHTTP1(true)
		}
		*t = &http.Transport{
			Protocols:           &p,
			DisableCompression:  true,
			IdleConnTimeout:     90 * time.Second,
			MaxIdleConnsPerHost: 16,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return s.Open(ctx, tunnel.Meta{Kind: tunnel.KindHTTP, Protocol: proto})
			},
		}
	}
	return *t
}

// TryMirror reserves a mirror slot (of the session, and of its developer's share); false (and a
// drop counted) when the developer is behind. Release it with MirrorDone.
func (s *Session) TryMirror() bool {
	select {
	case s.mirrors <- struct{}{}:
	default:
		s.Dropped()
		return false
	}
	if s.developer == nil {
		return true
	}
	select {
	case s.developer.slots <- struct{}{}:
		return true
	default:
		<-s.mirrors
		s.Dropped()
		return false
	}
}

// MirrorDone releases a TryMirror slot.
func (s *Session) MirrorDone() {
	if s.developer != nil {
		<-s.developer.slots
	}
	<-s.mirrors
}

// Go runs f in a goroutine the session owns: f's ctx ends with the session, and Registry.Remove
// waits for f to return. False (f not run) once the session ended.
func (s *Session) Go(f func(ctx context.Context)) bool {
	s.tmu.Lock()
	defer s.tmu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f(s.ctx)
	}()
	return true
}

// Dropped counts mirror data lost (a request, or a stream's copy).
func (s *Session) Dropped() {
	s.dropped.Add(1)
	s.metrics.MirrorDropped()
}

// Report counts what the session took and queues the event for the developer's CLI (dropped if
// the CLI is behind).
func (s *Session) Report(ev tunnel.Event) {
	if ev.Kind == tunnel.EventStream {
		s.streams.Add(1)
	} else {
		s.requests.Add(1)
	}
	s.metrics.SessionTook(string(s.Spec.Mode), string(ev.Kind))
	ev.Mode = s.Spec.Mode
	select {
	case s.events <- ev:
	default:
	}
}

// Info describes the session.
func (s *Session) Info() tunnel.SessionInfo {
	return tunnel.SessionInfo{ID: s.ID, Holder: s.Holder.String(), Spec: s.Spec, Since: s.Since,
		Streams: s.streams.Load(), Requests: s.requests.Load(), Dropped: s.dropped.Load()}
}

// close ends the session's goroutines and releases its connections to the developer.
func (s *Session) close() {
	s.tmu.Lock()
	s.closed = true
	s.tmu.Unlock()
	s.cancel()
	s.wg.Wait()
	s.closeIdle()
}

type key struct {
	namespace, name string
	port            uint16
}

// Registry holds the live sessions. Reads (For) are lock-free.
type Registry struct {
	mu         sync.Mutex
	byID       map[string]*Session
	developers map[spiffeid.ID]*budget // the mirror shares of the holders of byID
	view       atomic.Pointer[map[key][]*Session]
}

// Add registers s unless a steal already holds traffic s's steal could match. A session with s's
// ID that another replica holds for the same developer (a remote one: the developer's CLI moved
// to this replica and re-registered it) is replaced, not a conflict: a re-registering holder is
// never refused by its own old entry.
func (r *Registry) Add(s *Session) error {
	replaced, err := r.add(s)
	if replaced != nil {
		replaced.close()
	}
	return err
}

func (r *Registry) add(s *Session) (replaced *Session, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := r.byID[s.ID]
	if old != nil && (!old.Remote || old.Holder != s.Holder) {
		return nil, fmt.Errorf("session: the ID %s is taken by another session", s.ID)
	}
	k := key{s.Spec.Namespace, s.Spec.Service, s.Spec.Port}
	if s.Spec.Mode == Steal {
		for _, o := range r.byID {
			if o != old && o.Spec.Mode == Steal && (key{o.Spec.Namespace, o.Spec.Service, o.Spec.Port}) == k && overlaps(o.Spec.Filter, s.Spec.Filter) {
				return nil, &ConflictError{With: o, msg: fmt.Sprintf("session: %s port %d is already stolen by %s (session %s, %s) with a filter that overlaps this one; "+
					"two steals coexist only with different exact values of the same header", s.Host, k.port, o.Holder, o.ID, describe(o.Spec.Filter))}
			}
		}
	}
	if old != nil {
		r.removeLocked(old)
	}
	r.addLocked(s)
	return old, nil
}

func (r *Registry) addLocked(s *Session) {
	if r.byID == nil {
		r.byID, r.developers = map[string]*Session{}, map[spiffeid.ID]*budget{}
	}
	b := r.developers[s.Holder]
	if b == nil {
		b = &budget{slots: make(chan struct{}, MaxMirrorPerDeveloper)}
		r.developers[s.Holder] = b
	}
	b.refs++
	s.developer = b
	r.byID[s.ID] = s
	r.publishLocked()
}

// Get returns the session with this ID, or nil.
func (r *Registry) Get(id string) *Session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byID[id]
}

// Remove ends s: new traffic no longer matches it; it returns once s's goroutines did.
func (r *Registry) Remove(s *Session) {
	r.mu.Lock()
	if r.byID[s.ID] == s {
		r.removeLocked(s)
	}
	r.mu.Unlock()
	s.close()
}

func (r *Registry) removeLocked(s *Session) {
	delete(r.byID, s.ID)
	if b := r.developers[s.Holder]; b != nil {
		if b.refs--; b.refs == 0 {
			delete(r.developers, s.Holder)
		}
	}
	r.publishLocked()
}

func (r *Registry) publishLocked() {
	m := map[key][]*Session{}
	for _, s := range r.byID {
		k := key{s.Spec.Namespace, s.Spec.Service, s.Spec.Port}
		m[k] = append(m[k], s)
	}
	r.view.Store(&m)
}

// For returns the sessions on a service port (nil Registry: none).
func (r *Registry) For(namespace, name string, port uint16) []*Session {
	if r == nil {
		return nil
	}
	m := r.view.Load()
	if m == nil {
		return nil
	}
	return (*m)[key{namespace, name, port}]
}

// Sessions returns every session.
func (r *Registry) Sessions() []*Session {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*Session, 0, len(r.byID))
	for _, s := range r.byID {
		out = append(out, s)
	}
	return out
}

// List describes every session.
func (r *Registry) List() []tunnel.SessionInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]tunnel.SessionInfo, 0, len(r.byID))
	for _, s := range r.byID {
		out = append(out, s.Info())
	}
	return out
}

// describe renders a filter for messages.
func describe(f tunnel.Filter) string {
	if f.IsZero() {
		return "whole streams, no filter"
	}
	var parts []string
	for _, h := range f.HeaderMatches() {
		parts = append(parts, describeHeader(h))
	}
	if f.Path != "" {
		parts = append(parts, "path~"+f.Path)
	}
	if f.Method != "" {
		parts = append(parts, "method "+f.Method)
	}
	return strings.Join(parts, ", ")
}
