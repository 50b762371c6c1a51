package session_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/quic-go/quic-go.(*Transport).listen"))
}

var quiet = slog.New(slog.DiscardHandler)

// bed: a tunnel server (both transports) with a Manager over one service, web.demo (port 80 and
// 81), and policies.
type bed struct {
	ca       *devca.CA
	quicAddr string
	h2Addr   string
	reg      *session.Registry
}

func newBed(t *testing.T, policies ...*authz.Policy) *bed { return newBedWith(t, nil, policies...) }

// newBedWith is newBed with the Manager's options set by opts.
func newBedWith(t *testing.T, opts func(*session.Manager), policies ...*authz.Policy) *bed {
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	b := &bed{ca: ca, reg: &session.Registry{}}
	table, err := route.NewTable([]*route.Service{{Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.20")}, Ports: []route.Port{{Port: 80, TargetPort: 8080}, {Port: 81, TargetPort: 8081}},
		Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("10.244.0.20"), Ready: true, ServiceAccount: "web"}}},
		// the waypoint's own Service: its pods run as the waypoint's identity
		{Name: "detour", Namespace: "demo", Hostname: "detour.demo.svc.cluster.local",
			VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.30")}, Ports: []route.Port{{Port: 15008, TargetPort: 15008}},
			Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("10.244.0.30"), Ready: true, ServiceAccount: "detour"}}}})
	if err != nil {
		t.Fatal(err)
	}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, policies)
	m := &session.Manager{Registry: b.reg, Routes: func() *route.Table { return table }, Policies: func() *authz.Engine { return engine },
		Namespace: "demo", Gateway: "detour", Logger: quiet}
	if opts != nil {
		opts(m)
	}
	// Egress: a handler that answers with the stream's source, as the waypoint's policies would see it.
	m.Egress.TLS = identity.ServerTLS(b.id(t, "spiffe://cluster.local/ns/demo/sa/detour"), nil)
	m.Egress.Handler = hbone.HandlerFunc(func(s *hbone.Stream) error {
		if err := s.Accept(); err != nil {
			return err
		}
		_, err := io.WriteString(s, s.Request().PeerID.String()+" "+s.Request().Target.String())
		return errors.Join(err, s.CloseWrite())
	})
	srv := &tunnel.Server{Identity: b.id(t, "spiffe://cluster.local/ns/demo/sa/detour"), Handler: m.ServeTunnel, Logger: quiet}
	ctx, cancel := context.WithCancel(context.Background())
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{}, 2)
	go func() { srv.ServeQUIC(ctx, pc); done <- struct{}{} }()
	go func() { srv.ServeTCP(ctx, l); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done; pc.Close() })
	b.quicAddr, b.h2Addr = pc.LocalAddr().String(), l.Addr().String()
	return b
}

func (b *bed) id(t *testing.T, id string) identity.Source {
	svid, err := b.ca.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return identity.Static(&identity.Identity{SVID: svid, Bundle: b.ca.Bundle()})
}

// register opens a tunnel as dev and asks for spec; it returns the tunnel (open while the
// session lives) and the reply.
func (b *bed) register(t *testing.T, transport, dev string, spec tunnel.Spec) (*tunnel.Tunnel, tunnel.Reply) {
	t.Helper()
	addr := b.quicAddr
	if transport == "h2" {
		addr = b.h2Addr
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tn, err := tunnel.Dial(ctx, transport, addr, b.id(t, "spiffe://cluster.local/ns/dev/sa/"+dev), nil, quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tn.Close() })
	if err := tunnel.WriteMsg(tn.Control(), tunnel.Hello{Register: &spec}); err != nil {
		t.Fatal(err)
	}
	var r tunnel.Reply
	if err := tunnel.ReadMsg(tn.Control(), &r); err != nil {
		t.Fatal(err)
	}
	return tn, r
}

func grant(name string, action secv1beta1.AuthorizationPolicy_Action, principal string, methods ...string) *authz.Policy {
	rule := &secv1beta1.Rule{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{principal}}}}}
	if len(methods) > 0 {
		rule.To = []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: methods, Hosts: []string{"web.demo.svc.cluster.local"}}}}
	}
	return &authz.Policy{Namespace: "demo", Name: name, Spec: &secv1beta1.AuthorizationPolicy{Action: action,
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
		Rules:      []*secv1beta1.Rule{rule}}}
}

func steal(filter tunnel.Filter) tunnel.Spec {
	return tunnel.Spec{Namespace: "demo", Service: "web", Port: 80, Mode: session.Steal, Filter: filter}
}

// Registration is denied by default, granted only by an ALLOW naming the method, and DENY wins;
// a refusal says which policy would grant it.
func TestRegistrationPolicy(t *testing.T) {
	for _, transport := range []string{"quic", "h2"} {
		t.Run(transport, func(t *testing.T) {
			b := newBed(t,
				grant("alice-steals", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/alice", "STEAL"),
				grant("bob-everything", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/bob"), // no methods: grants nothing
				grant("mallory-steals", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/mallory", "STEAL", "MIRROR"),
				grant("but-not-mallory", secv1beta1.AuthorizationPolicy_DENY, "cluster.local/ns/dev/sa/mallory"),
			)
			mirror := steal(tunnel.Filter{})
			mirror.Mode = session.Mirror
			for _, tc := range []struct {
				dev  string
				spec tunnel.Spec
				want string // "" means accepted
			}{
				{"alice", steal(tunnel.Filter{}), ""},
				{"alice", mirror, "MIRROR on web.demo.svc.cluster.local port 80 refused for cluster.local/ns/dev/sa/alice: no ALLOW policy names method MIRROR"},
				{"bob", mirror, "refused for cluster.local/ns/dev/sa/bob: no ALLOW policy names method MIRROR"},
				{"mallory", mirror, "refused for cluster.local/ns/dev/sa/mallory: denied by DENY policy demo/but-not-mallory"},
				{"carol", steal(tunnel.Filter{Header: "x-dev", HeaderValue: "carol"}), "no ALLOW policy names method STEAL"},
				{"alice", tunnel.Spec{Namespace: "demo", Service: "nope", Mode: "steal"}, "session: service demo/nope is not known to this waypoint"},
				{"alice", tunnel.Spec{Namespace: "demo", Service: "web", Mode: "steal"}, "session: service demo/web has 2 ports; name one"},
				{"alice", tunnel.Spec{Namespace: "demo", Service: "web", Port: 80, Mode: "borrow"}, `session: mode "borrow" is not steal or mirror`},
			} {
				tn, r := b.register(t, transport, tc.dev, tc.spec)
				switch {
				case tc.want == "" && !r.OK:
					t.Errorf("%s %+v: refused: %s", tc.dev, tc.spec, r.Error)
				case tc.want != "" && (r.OK || !strings.Contains(r.Error, tc.want)):
					t.Errorf("%s %+v: got %+v, want an error containing %q", tc.dev, tc.spec, r, tc.want)
				}
				if tc.want != "" && strings.Contains(tc.want, "ALLOW policy names") && !strings.Contains(r.Error, "methods: [") {
					t.Errorf("refusal without the policy that would grant it: %s", r.Error)
				}
				tn.Close()
			}
		})
	}
}

// A second developer whose filter overlaps the first's is refused, naming the first; a filter
// on another value of the same header coexists; the session ends with its tunnel.
func TestConflicts(t *testing.T) {
	b := newBed(t, grant("devs", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/*", "STEAL", "MIRROR"))
	alice, r := b.register(t, "quic", "alice", steal(tunnel.Filter{Header: "x-dev", HeaderValue: "alice"}))
	if !r.OK {
		t.Fatal(r.Error)
	}
	_, r = b.register(t, "h2", "bob", steal(tunnel.Filter{Header: "x-dev", HeaderRegex: "b.*"}))
	if r.OK || !strings.Contains(r.Error, "already stolen by spiffe://cluster.local/ns/dev/sa/alice") || !strings.Contains(r.Error, "header x-dev=alice") {
		t.Fatalf("overlapping steal: %+v", r)
	}
	_, r = b.register(t, "h2", "bob", steal(tunnel.Filter{}))
	if r.OK || !strings.Contains(r.Error, "sa/alice") {
		t.Fatalf("whole steal over a filtered one: %+v", r)
	}
	_, r = b.register(t, "h2", "bob", steal(tunnel.Filter{Header: "X-Dev", HeaderValue: "bob"}))
	if !r.OK {
		t.Fatalf("disjoint steal refused: %s", r.Error)
	}
	mirror := steal(tunnel.Filter{})
	mirror.Mode = session.Mirror
	if _, r = b.register(t, "quic", "carol", mirror); !r.OK {
		t.Fatalf("a mirror alongside steals refused: %s", r.Error)
	}
	if n := len(b.reg.For("demo", "web", 80)); n != 3 {
		t.Fatalf("%d sessions, want 3", n)
	}
	alice.Close()
	deadline := time.Now().Add(5 * time.Second)
	for len(b.reg.For("demo", "web", 80)) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("alice's session outlived her tunnel")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, r = b.register(t, "quic", "dave", steal(tunnel.Filter{Header: "x-dev", HeaderValue: "alice"})); !r.OK {
		t.Fatalf("alice's filter not free after she left: %s", r.Error)
	}
	list := b.reg.List()
	if len(list) != 3 {
		t.Fatalf("list: %+v", list)
	}
	for _, s := range list {
		if s.Holder == "" || s.ID == "" || s.Spec.Port != 80 {
			t.Errorf("list entry %+v", s)
		}
	}

}

// allocated is what f allocates, in the whole process.
func allocated(f func()) uint64 {
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// A Hello costs nothing proportional to its size before the policy said yes: a refused developer's
// huge regex is never compiled, and an authorized developer's regex is bounded in length and in
// compiled size (counted repetitions multiply), each refusal one line saying what to change.
func TestHelloAuthorizedBeforeWork(t *testing.T) {
	b := newBed(t, grant("alice-steals", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/alice", "STEAL"))
	const ceiling = 16 << 20 // a tunnel's handshake and buffers; a compiled `a{1000}`x146 is 36 MB
	for _, tc := range []struct {
		name, dev, regex, want string
	}{
		{"huge, refused by policy", "mallory", strings.Repeat("a{1000}", 2600),
			"session: the registration is larger than 8192 bytes: shorten its filter (regexes of at most 1024 bytes)"},
		{"1 KiB, refused by policy", "mallory", strings.Repeat("a{1000}", 146),
			"STEAL on web.demo.svc.cluster.local port 80 refused for cluster.local/ns/dev/sa/mallory: no ALLOW policy names method STEAL"},
		{"1 KiB, authorized", "alice", strings.Repeat("a{1000}", 146),
			"session: the header regex expands to more than 10000 instructions: use fewer or smaller counted repetitions ({n})"},
		{"2 KiB, authorized", "alice", strings.Repeat("ab", 1024),
			"session: the header regex is 2048 bytes long, at most 1024: shorten it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r tunnel.Reply
			cost := allocated(func() {
				_, r = b.register(t, "quic", tc.dev, steal(tunnel.Filter{Header: "x-dev", HeaderRegex: tc.regex}))
			})
			if r.OK || !strings.HasPrefix(r.Error, tc.want) {
				t.Errorf("reply %+v, want an error starting %q", r, tc.want)
			}
			if cost > ceiling {
				t.Errorf("the refused Hello cost %d MB, want at most %d MB", cost>>20, ceiling>>20)
			}
		})
	}
	// A regex within the bounds still works.
	if _, r := b.register(t, "h2", "alice", steal(tunnel.Filter{Header: "x-dev", HeaderRegex: "^(alice|a{3,30})$", Path: "^/api/"})); !r.OK {
		t.Fatalf("a small regex refused: %s", r.Error)
	}
}

// hello opens a tunnel as dev and sends h; it returns the tunnel and the reply.
func (b *bed) hello(t *testing.T, dev string, h tunnel.Hello) (*tunnel.Tunnel, tunnel.Reply) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tn, err := tunnel.Dial(ctx, "quic", b.quicAddr, b.id(t, "spiffe://cluster.local/ns/dev/sa/"+dev), nil, quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tn.Close() })
	if err := tunnel.WriteMsg(tn.Control(), h); err != nil {
		t.Fatal(err)
	}
	var r tunnel.Reply
	if err := tunnel.ReadMsg(tn.Control(), &r); err != nil {
		t.Fatal(err)
	}
	return tn, r
}

// `list` shows a developer its own sessions, and others' only on service ports it holds a grant
// on: LIST, or a STEAL or MIRROR that would cover the same port.
func TestListShowsOnlyWhatAGrantCovers(t *testing.T) {
	onWeb := func(name, principal, method, path string) *authz.Policy {
		p := grant(name, secv1beta1.AuthorizationPolicy_ALLOW, principal, method)
		p.Spec.Rules[0].To[0].Operation.Paths = []string{path}
		return p
	}
	b := newBed(t,
		onWeb("alice", "cluster.local/ns/dev/sa/alice", "STEAL", "/ports/80"),
		onWeb("bob", "cluster.local/ns/dev/sa/bob", "STEAL", "/ports/81"), // another port of the service
		onWeb("carol", "cluster.local/ns/dev/sa/carol", "LIST", "/ports/*"),
		onWeb("erin", "cluster.local/ns/dev/sa/erin", "MIRROR", "/ports/80"),
	)
	if _, r := b.register(t, "quic", "alice", steal(tunnel.Filter{Header: "x-dev", HeaderValue: "alice"})); !r.OK {
		t.Fatal(r.Error)
	}
	own := steal(tunnel.Filter{})
	own.Port = 81
	if _, r := b.register(t, "quic", "bob", own); !r.OK {
		t.Fatal(r.Error)
	}
	for dev, want := range map[string][]string{
		"alice":   {"sa/alice"},           // her own; no grant on port 81
		"bob":     {"sa/bob"},             // his own; a grant on port 81 says nothing about port 80
		"carol":   {"sa/alice", "sa/bob"}, // LIST on every port
		"erin":    {"sa/alice"},           // MIRROR on port 80
		"mallory": nil,                    // no grant
	} {
		_, r := b.hello(t, dev, tunnel.Hello{List: true})
		var got []string
		for _, s := range r.Sessions {
			got = append(got, s.Holder[strings.LastIndex(s.Holder, "sa/"):])
		}
		slices.Sort(got)
		if !r.OK || !slices.Equal(got, want) {
			t.Errorf("%s lists %v (%+v), want %v", dev, got, r, want)
		}
	}
}

// IMPERSONATE never yields the waypoint's own identity, even with a grant on the waypoint's
// Service; the egress link never opens a relay between replicas, whoever it speaks as.
func TestImpersonateNeverTheWaypoint(t *testing.T) {
	imp := func(host string) *authz.Policy {
		p := grant("imp-"+host, secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/alice", "IMPERSONATE")
		p.Spec.Rules[0].To[0].Operation.Hosts = []string{host}
		return p
	}
	b := newBed(t, imp("detour.demo.svc.cluster.local"), imp("web.demo.svc.cluster.local"))
	_, r := b.hello(t, "alice", tunnel.Hello{Egress: true, AsTarget: &tunnel.Target{Namespace: "demo", Service: "detour"}})
	want := "session: IMPERSONATE of detour.demo.svc.cluster.local refused: its workloads run as this waypoint's own identity " +
		"(spiffe://cluster.local/ns/demo/sa/detour), which no grant hands out; impersonate the service you debug instead"
	if r.OK || r.Error != want {
		t.Errorf("impersonating the waypoint: %+v, want %q", r, want)
	}
	tn, r := b.hello(t, "alice", tunnel.Hello{Egress: true, AsTarget: &tunnel.Target{Namespace: "demo", Service: "web"}})
	if !r.OK {
		t.Fatalf("impersonating web: %s", r.Error)
	}
	cc := b.egressLink(t, tn, "alice")
	if got := egressGet(t, cc, "10.96.0.20:80"); got != "spiffe://cluster.local/ns/demo/sa/web 10.96.0.20:80" {
		t.Errorf("egress as web: %q", got)
	}
	if got := egressGet(t, cc, "relay.detour.internal:1"); got != "403" {
		t.Errorf("egress to the relay authority: %q, want 403", got)
	}
}

// egressLink accepts the waypoint's egress stream on tn and speaks HBONE over it as dev.
func (b *bed) egressLink(t *testing.T, tn *tunnel.Tunnel, dev string) *hbone.ClientConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, c, err := tn.Accept(ctx)
	if err != nil || m.Kind != "hbone" {
		t.Fatalf("egress stream: %+v %v", m, err)
	}
	if err := tunnel.AckStream(c, nil); err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := identity.ClientTLS(b.id(t, "spiffe://cluster.local/ns/dev/sa/"+dev), spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/detour"))
	if err != nil {
		t.Fatal(err)
	}
	cc, err := hbone.NewClientConn(ctx, c, tlsCfg, hbone.Config{}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// egressGet opens a stream to target over the egress link: what the handler answered, or the
// CONNECT's status.
func egressGet(t *testing.T, cc *hbone.ClientConn, target string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := cc.Dial(ctx, target, hbone.DialOptions{})
	var se *hbone.StatusError
	if errors.As(err, &se) {
		return strconv.Itoa(se.Code)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	return string(got)
}
