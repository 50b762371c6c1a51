package waypoint_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// `detour sessions end ID` asked of a replica that does not hold the session (it knows it as a
// remote one, relayed to the holder): that replica authorizes the request and relays it to the
// holder, which ends the session (its CLI told who ended it) and answers once it is released.
// Someone the policies let neither end nor see the session gets the unknown-ID answer, and nothing
// reaches the holder.
func TestEndRemoteSession(t *testing.T) {
	b := newSessionBed(t) // replica B: it holds alice's session
	spec := tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: tunnel.ModeSteal, Filter: tunnel.Filter{Header: "x-dev", HeaderValue: "alice"}}
	tn, id := b.connect(t, b.tunnel, spec, b.app(t, echoApp))
	last := make(chan tunnel.Event, 1)
	go func() { // the CLI: on EventEnded it hangs up
		var ev tunnel.Event
		for tunnel.ReadMsg(tn.Control(), &ev) == nil && ev.Kind != tunnel.EventEnded {
		}
		tn.Control().(interface{ CloseWrite() error }).CloseWrite()
		last <- ev
	}()
	local := b.reg.Get(id)

	// Replica A: the same waypoint identity, alice's session as a remote one relayed to B, and
	// a policy granting bob END on echo.
	regA := &session.Registry{}
	dialer := &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { dialer.Close() })
	hA := &waypoint.Handler{Routes: func() *route.Table { return nil }, Identity: b.wpID, Dialer: dialer, Sessions: regA, Logger: quiet}
	remote, err := session.NewRemote(id, local.Spec, local.Host, local.Holder, hA.RelayOpener(b.waypoint, id))
	if err != nil {
		t.Fatal(err)
	}
	if err := regA.Add(remote); err != nil {
		t.Fatal(err)
	}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{{Namespace: "demo", Name: "bob-ends",
		Spec: &secv1beta1.AuthorizationPolicy{Action: secv1beta1.AuthorizationPolicy_ALLOW,
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
			Rules: []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{"cluster.local/ns/dev/sa/bob"}}}},
				To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"END"}}}}}}}}})
	mA := &session.Manager{Registry: regA, Policies: func() *authz.Engine { return engine }, Namespace: "demo", Gateway: "detour", Logger: quiet}
	srvA := &tunnel.Server{Identity: b.wpID, Handler: mA.ServeTunnel, Logger: quiet}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { srvA.ServeTCP(ctx, l); close(served) }()
	t.Cleanup(func() { cancel(); <-served })
	end := func(dev string) tunnel.Reply {
		t.Helper()
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // a hang guard
		defer cancel()
		c, err := tunnel.Dial(dctx, "h2", l.Addr().String(), b.id(t, "spiffe://cluster.local/ns/dev/sa/"+dev), nil, quiet)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := tunnel.WriteMsg(c.Control(), tunnel.Hello{End: id}); err != nil {
			t.Fatal(err)
		}
		var r tunnel.Reply
		if err := tunnel.ReadMsg(c.Control(), &r); err != nil {
			t.Fatal(err)
		}
		return r
	}

	if r := end("carol"); r.OK || r.Error != "session: no session "+id+" on this waypoint (`detour sessions` lists the ones you may see)" {
		t.Fatalf("carol ends it: %+v", r)
	}
	if b.reg.Get(id) == nil {
		t.Fatal("a refused end ended the session at its holder")
	}
	if r := end("bob"); !r.OK || r.Session != id {
		t.Fatalf("bob ends it through the replica that does not hold it: %+v", r)
	}
	if b.reg.Get(id) != nil {
		t.Fatal("ended, but still registered at its holder")
	}
	if ev := <-last; ev.Kind != tunnel.EventEnded || ev.Error != "ended by cluster.local/ns/dev/sa/bob (detour sessions end)" {
		t.Fatalf("the CLI's last event: %+v", ev)
	}
	// The holder knows it no more: a second relayed end says so, in one line.
	if r := end("bob"); r.OK || !strings.HasPrefix(r.Error, "session: session "+id+" is held by another waypoint replica, which did not end it: ") {
		t.Fatalf("ending it again: %+v", r)
	}
}
