package session_test

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

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

func newBed(t *testing.T, policies ...*authz.Policy) *bed {
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	b := &bed{ca: ca, reg: &session.Registry{}}
	table, err := route.NewTable([]*route.Service{{Name: "web", Namespace: "demo", Hostname: "web.demo.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.20")}, Ports: []route.Port{{Port: 80, TargetPort: 8080}, {Port: 81, TargetPort: 8081}}}})
	if err != nil {
		t.Fatal(err)
	}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, policies)
	m := &session.Manager{Registry: b.reg, Routes: func() *route.Table { return table }, Policies: func() *authz.Engine { return engine },
		Namespace: "demo", Gateway: "detour", Logger: quiet}
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
