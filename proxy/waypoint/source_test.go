package waypoint_test

import (
	"context"
	"errors"
	"testing"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

func allowFrom(service string, src *secv1beta1.Source) *authz.Policy {
	return &authz.Policy{Namespace: "demo", Name: "pods-only", Spec: &secv1beta1.AuthorizationPolicy{
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: service}},
		Rules:      []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: src}}}},
	}}
}

// ipBlocks judge the connection's peer (ztunnel's conn.src, Envoy's direct_remote_ip), never
// a Forwarded header the client wrote: a client from 127.0.0.1 is refused with and without a
// forged for= inside the allowed block, and the header still reaches the destination.
func TestIPBlocksJudgeThePeerNotForwarded(t *testing.T) {
	pol := allowFrom("echo", &secv1beta1.Source{IpBlocks: []string{"10.244.0.0/16"}})
	b := newBedWith(t, "echo", func(h *waypoint.Handler) {
		engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{pol})
		h.Policies = func() *authz.Engine { return engine }
	})
	for _, fwd := range []string{"", `for="10.244.1.1:1234"`} {
		b.opts.Forwarded = fwd
		_, err := b.roundTrip(context.Background(), "10.96.0.10:80", "x")
		var se *hbone.StatusError
		if !errors.As(err, &se) || se.Code != 403 {
			t.Errorf("Forwarded %q: got %v, want 403", fwd, err)
		}
	}
	if len(b.hits) != 0 {
		t.Fatalf("a refused stream reached a backend: %v", b.hits)
	}
	// The peer's own block admits it, forged header or not; the header is carried on.
	loopback := allowFrom("echo", &secv1beta1.Source{IpBlocks: []string{"127.0.0.0/8"}})
	b = newBedWith(t, "echo", func(h *waypoint.Handler) {
		engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{loopback})
		h.Policies = func() *authz.Engine { return engine }
	})
	b.opts.Forwarded = `for="10.244.1.1:1234"`
	if _, err := b.roundTrip(context.Background(), "10.96.0.10:80", "x"); err != nil {
		t.Fatal(err)
	}
	if len(b.fwd) != 1 || b.fwd[0] != `for="10.244.1.1:1234"` {
		t.Fatalf("Forwarded not carried on: %q", b.fwd)
	}
}

// Per HTTP request too: ipBlocks take the peer; remoteIpBlocks take the rightmost
// X-Forwarded-For (Envoy's remote address with use_remote_address false and no trusted hops),
// else the peer; Forwarded is never read.
func TestHTTPSourceAddresses(t *testing.T) {
	for _, tc := range []struct {
		name    string
		src     *secv1beta1.Source
		hdr     []string
		code    int
		trusted int // NumTrustedProxies
	}{
		{"ipBlocks, no header", &secv1beta1.Source{IpBlocks: []string{"10.244.0.0/16"}}, nil, 403, 0},
		{"ipBlocks, forged Forwarded", &secv1beta1.Source{IpBlocks: []string{"10.244.0.0/16"}}, []string{"Forwarded", `for="10.244.1.1:1234"`}, 403, 0},
		{"ipBlocks, forged X-Forwarded-For", &secv1beta1.Source{IpBlocks: []string{"10.244.0.0/16"}}, []string{"X-Forwarded-For", "10.244.1.1"}, 403, 0},
		{"ipBlocks, the peer", &secv1beta1.Source{IpBlocks: []string{"127.0.0.0/8"}}, []string{"Forwarded", `for="10.9.9.9"`}, 200, 0},
		{"remoteIpBlocks, rightmost X-Forwarded-For", &secv1beta1.Source{RemoteIpBlocks: []string{"10.244.0.0/16"}}, []string{"X-Forwarded-For", "1.2.3.4, 10.244.1.1"}, 200, 0},
		{"remoteIpBlocks, not the leftmost", &secv1beta1.Source{RemoteIpBlocks: []string{"10.244.0.0/16"}}, []string{"X-Forwarded-For", "10.244.1.1, 1.2.3.4"}, 403, 0},
		{"remoteIpBlocks, Forwarded ignored", &secv1beta1.Source{RemoteIpBlocks: []string{"10.244.0.0/16"}}, []string{"Forwarded", `for="10.244.1.1"`}, 403, 0},
		{"remoteIpBlocks, no header: the peer", &secv1beta1.Source{RemoteIpBlocks: []string{"127.0.0.0/8"}}, nil, 200, 0},
		// One trusted proxy in front appended its client: the entry one from the right.
		{"remoteIpBlocks, one trusted proxy", &secv1beta1.Source{RemoteIpBlocks: []string{"10.244.0.0/16"}}, []string{"X-Forwarded-For", "10.244.1.1, 1.2.3.4"}, 200, 1},
		{"remoteIpBlocks, one trusted proxy, not the rightmost", &secv1beta1.Source{RemoteIpBlocks: []string{"10.244.0.0/16"}}, []string{"X-Forwarded-For", "1.2.3.4, 10.244.1.1"}, 403, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newHTTPBed(t, route.Port{Name: "http-web", Port: 80}, func(h *waypoint.Handler) { h.NumTrustedProxies = tc.trusted }, allowFrom("web", tc.src))
			b.opts.Forwarded = `for="10.244.1.1:1234"` // the CONNECT's own header, forged too
			c, _ := b.httpClient(t, false)
			if code, body, _ := get(t, c, "http://10.96.0.20:80/", tc.hdr...); code != tc.code {
				t.Errorf("%d %q, want %d", code, body[:min(len(body), 40)], tc.code)
			}
		})
	}
}
