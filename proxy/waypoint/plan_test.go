package waypoint

import (
	"errors"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/sniff"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// The plan of a CONNECT is a value: each case builds one from a request and the tables, with no
// socket anywhere, and compares what the waypoint would do (or the refusal, word for word).
func TestPlan(t *testing.T) {
	ep := []route.Endpoint{{IP: netip.MustParseAddr("10.244.0.5"), Ready: true, ServiceAccount: "web"}}
	svc := func(name, vip string, port route.Port, eps []route.Endpoint) *route.Service {
		return &route.Service{Name: name, Namespace: "demo", Hostname: name + ".demo.svc.cluster.local",
			VIPs: []netip.Addr{netip.MustParseAddr(vip)}, Ports: []route.Port{port}, Endpoints: eps}
	}
	table, err := route.NewTable([]*route.Service{
		svc("web", "10.96.0.10", route.Port{Port: 80, TargetPort: 8080}, ep),                    // undeclared: sniffed when inspected
		svc("db", "10.96.0.11", route.Port{Name: "tcp-db", Port: 5432, TargetPort: 5432}, ep),   // declared opaque
		svc("api", "10.96.0.12", route.Port{Name: "http", Port: 80, TargetPort: 8080}, ep),      // declared HTTP
		svc("empty", "10.96.0.13", route.Port{Port: 80, TargetPort: 8080}, nil),                 // no endpoints
		svc("taken", "10.96.0.14", route.Port{Port: 80, TargetPort: 8080}, nil),                 // no endpoints, stolen whole
		svc("filtered", "10.96.0.15", route.Port{Port: 80, TargetPort: 8080}, ep),               // a header-filtered session
		svc("plain", "10.96.0.18", route.Port{Port: 80, TargetPort: 8080}, ep),                  // undeclared, an L4 DENY
		svc("raw", "10.96.0.19", route.Port{Name: "tcp", Port: 9000, TargetPort: 9000}, ep),     // declared TCP, an L4 DENY
		svc("secure", "10.96.0.21", route.Port{Name: "https", Port: 443, TargetPort: 8443}, ep), // declared TLS
		func() *route.Service {
			s := svc("other", "10.96.0.16", route.Port{Port: 80}, ep)
			s.Unbound = true
			return s
		}(),
		func() *route.Service {
			s := svc("detour", "10.96.0.17", route.Port{Port: 15008}, nil)
			s.Self = true
			return s
		}(),
	})
	if err != nil {
		t.Fatal(err)
	}
	reg := &session.Registry{}
	taken := addSession(t, reg, tunnel.Spec{Namespace: "demo", Service: "taken", Port: 80, Mode: session.Steal})
	addSession(t, reg, tunnel.Spec{Namespace: "demo", Service: "filtered", Port: 80, Mode: session.Steal, Filter: tunnel.Filter{Header: "x-dev", HeaderValue: "alice"}})
	policy := func(name, service string, rule *secv1beta1.Rule, action secv1beta1.AuthorizationPolicy_Action) *authz.Policy {
		return &authz.Policy{Namespace: "demo", Name: name, Spec: &secv1beta1.AuthorizationPolicy{Action: action,
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: service}}, Rules: []*secv1beta1.Rule{rule}}}
	}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{
		// web and db: an HTTP attribute, so web (sniffable) is inspected; db (declared TCP) is not.
		policy("admin", "web", &secv1beta1.Rule{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Paths: []string{"/admin"}}}}}, secv1beta1.AuthorizationPolicy_DENY),
		policy("admin-db", "db", &secv1beta1.Rule{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Paths: []string{"/admin"}}}}}, secv1beta1.AuthorizationPolicy_DENY),
		// api: only sleep, decided at CONNECT time.
		policy("sleep-only", "api", &secv1beta1.Rule{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{"cluster.local/ns/default/sa/sleep"}}}}}, secv1beta1.AuthorizationPolicy_ALLOW),
		// plain and raw: a DENY of curl that needs no HTTP attribute.
		policy("no-curl", "plain", &secv1beta1.Rule{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{"cluster.local/ns/default/sa/curl"}}}}}, secv1beta1.AuthorizationPolicy_DENY),
		policy("no-curl-raw", "raw", &secv1beta1.Rule{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{"cluster.local/ns/default/sa/curl"}}}}}, secv1beta1.AuthorizationPolicy_DENY),
	})
	h := &Handler{Routes: func() *route.Table { return table }, Policies: func() *authz.Engine { return engine }, Sessions: reg}

	type want struct {
		relay, inspect bool
		proto          sniff.Protocol
		declared       bool
		service        string
		steal          *session.Session
	}
	for _, tc := range []struct {
		name, target, peer string
		header             http.Header
		inspect            Inspect
		want               want
		err                string
		is                 error
	}{
		{name: "relay", target: "relay.detour.internal:1", want: want{relay: true}},
		{name: "a hostname", target: "web.demo:80", err: "waypoint: hbone: malformed authority: a waypoint is addressed by IP, got web.demo:80", is: hbone.ErrBadAuthority},
		{name: "detour's hop marker", target: "10.96.0.10:80", header: http.Header{HopHeader: {"spiffe://cluster.local/ns/demo/sa/detour"}},
			err: "waypoint: hbone: malformed authority: 10.96.0.10:80 was already forwarded by a detour waypoint (Detour-Hop: spiffe://cluster.local/ns/demo/sa/detour): a forwarding loop", is: hbone.ErrBadAuthority},
		{name: "the waypoint's own VIP", target: "10.96.0.17:15008", err: "waypoint: hbone: malformed authority: 10.96.0.17:15008 is this waypoint's own address: a forwarding loop", is: hbone.ErrBadAuthority},
		{name: "not bound here", target: "10.96.0.16:80", is: hbone.ErrForbidden},
		{name: "unknown", target: "10.96.9.9:80", is: hbone.ErrUnavailable},
		{name: "no endpoints", target: "10.96.0.13:80", is: hbone.ErrUnavailable},
		{name: "no endpoints, stolen whole", target: "10.96.0.14:80", want: want{service: "taken", steal: taken}},
		{name: "an HTTP policy: sniffed", target: "10.96.0.10:80", want: want{service: "web", inspect: true}},
		// Its HTTP attribute is unknowable on an opaque port: the DENY applies, at CONNECT (as Istio).
		{name: "an HTTP DENY on a declared TCP port: decided now, closed", target: "10.96.0.11:5432",
			err: "hbone: forbidden: RBAC: access denied: denied by DENY policy demo/admin-db", is: hbone.ErrForbidden},
		// As Istio's waypoint: HTTP parsed on a declared HTTP port, an undeclared port sniffed,
		// so an L4 policy's denial is a 403 per request, not a refused CONNECT.
		{name: "declared HTTP, an L4 ALLOW: parsed", target: "10.96.0.12:80", peer: "spiffe://cluster.local/ns/default/sa/sleep", want: want{service: "api", proto: sniff.HTTP1, declared: true, inspect: true}},
		{name: "declared HTTP, denied by an L4 ALLOW: parsed, decided per request", target: "10.96.0.12:80", want: want{service: "api", proto: sniff.HTTP1, declared: true, inspect: true}},
		{name: "undeclared, an L4 DENY: sniffed, decided after", target: "10.96.0.18:80", want: want{service: "plain", inspect: true}},
		{name: "declared TCP, an L4 DENY: decided now, closed", target: "10.96.0.19:9000", err: "hbone: forbidden: RBAC: access denied: denied by DENY policy demo/no-curl-raw", is: hbone.ErrForbidden},
		{name: "declared TLS, no SNI policy: opaque", target: "10.96.0.21:443", want: want{service: "secure", proto: sniff.TLS, declared: true}},
		{name: "inspect: always", target: "10.96.0.12:80", peer: "spiffe://cluster.local/ns/default/sa/sleep", inspect: InspectAlways,
			want: want{service: "api", proto: sniff.HTTP1, declared: true, inspect: true}},
		{name: "inspect: always, declared TLS: sniffed", target: "10.96.0.21:443", inspect: InspectAlways, want: want{service: "secure", proto: sniff.TLS, declared: true, inspect: true}},
		// inspect: opaque, detour's opaque-first opt-in: decided at CONNECT unless a policy needs HTTP.
		{name: "inspect: opaque, declared HTTP, allowed at CONNECT", target: "10.96.0.12:80", peer: "spiffe://cluster.local/ns/default/sa/sleep", inspect: InspectOpaque,
			want: want{service: "api", proto: sniff.HTTP1, declared: true}},
		{name: "inspect: opaque, declared HTTP, denied at CONNECT", target: "10.96.0.12:80", inspect: InspectOpaque, err: "hbone: forbidden: RBAC: access denied", is: hbone.ErrForbidden},
		{name: "inspect: opaque, undeclared, denied at CONNECT", target: "10.96.0.18:80", inspect: InspectOpaque, err: "hbone: forbidden: RBAC: access denied: denied by DENY policy demo/no-curl", is: hbone.ErrForbidden},
		{name: "inspect: opaque, an HTTP policy: sniffed", target: "10.96.0.10:80", inspect: InspectOpaque, want: want{service: "web", inspect: true}},
		{name: "a filtered session: parsed", target: "10.96.0.15:80", want: want{service: "filtered", inspect: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peer := tc.peer
			if peer == "" {
				peer = "spiffe://cluster.local/ns/default/sa/curl"
			}
			target, err := hbone.ParseTarget(tc.target)
			if err != nil {
				t.Fatal(err)
			}
			req := &hbone.Request{Target: target, PeerID: spiffeid.RequireFromString(peer), Header: tc.header,
				RemoteAddr: &net.TCPAddr{IP: net.IPv4(10, 244, 1, 7), Port: 40000}}
			h.Inspect = tc.inspect
			p, err := h.plan(req)
			if tc.is != nil || tc.err != "" {
				if err == nil || (tc.is != nil && !errors.Is(err, tc.is)) || (tc.err != "" && !strings.HasPrefix(err.Error(), tc.err)) {
					t.Fatalf("plan: %v, want an error wrapping %v starting %q", err, tc.is, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("plan: %v", err)
			}
			got := want{relay: p.relay, inspect: p.inspect, proto: p.proto, declared: p.declared, steal: p.steal}
			if p.dest != nil && p.dest.Service != nil {
				got.service = p.dest.Service.Name
			}
			if got != tc.want {
				t.Errorf("plan %+v, want %+v", got, tc.want)
			}
		})
	}
}

// addSession registers alice's session spec in reg until the test ends.
func addSession(t *testing.T, reg *session.Registry, spec tunnel.Spec) *session.Session {
	t.Helper()
	s, err := session.New(spec, spec.Service+"."+spec.Namespace+".svc.cluster.local", spiffeid.RequireFromString("spiffe://cluster.local/ns/dev/sa/alice"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Add(s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Remove(s) })
	return s
}
