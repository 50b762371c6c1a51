package session_test

import (
	"strings"
	"testing"

	secv1beta1 "istio.io/api/security/v1beta1"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// `detour sessions end ID`: the holder, or a principal granted the session's own method (or END)
// on its port, ends it; its CLI is told (EventEnded) and it is gone when the answer comes. Anyone
// else gets one line: refused with the policy that would grant it when they may see the session,
// else the same answer as for an unknown ID.
func TestEnd(t *testing.T) {
	allow := secv1beta1.AuthorizationPolicy_ALLOW
	b := newBed(t,
		grant("devs", allow, "cluster.local/ns/dev/sa/alice", "STEAL"),
		grant("bob", allow, "cluster.local/ns/dev/sa/bob", "END"),
		grant("carol", allow, "cluster.local/ns/dev/sa/carol", "LIST"))
	// register starts alice's session, and reads its events as the CLI does: on EventEnded it
	// hangs up and sends the event on last.
	register := func() (*tunnel.Tunnel, string, chan tunnel.Event) {
		spec := steal(tunnel.Filter{Header: "x-dev", HeaderValue: "alice"})
		tn, r := b.hello(t, "alice", resumable(spec, ""))
		if !r.OK {
			t.Fatalf("registration: %+v", r)
		}
		last := make(chan tunnel.Event, 1)
		go func() {
			var ev tunnel.Event
			for tunnel.ReadMsg(tn.Control(), &ev) == nil && ev.Kind != tunnel.EventEnded {
			}
			tn.Control().(interface{ CloseWrite() error }).CloseWrite()
			last <- ev
		}()
		return tn, r.Session, last
	}
	tn, id, last := register()
	unknown := "session: no session " + id + " on this waypoint (`detour sessions` lists the ones you may see)"
	for _, tc := range []struct{ dev, id, want string }{
		{"dave", id, unknown},
		{"alice", "0123456789ab", "session: no session 0123456789ab on this waypoint (`detour sessions` lists the ones you may see)"},
		{"alice", "x", "session: \"x\" is not a session ID (12 hex digits, as `detour sessions` lists them)"},
		{"carol", id, "session: ending session " + id + " refused for cluster.local/ns/dev/sa/carol: only its developer (spiffe://cluster.local/ns/dev/sa/alice) or a principal granted END or STEAL on web.demo.svc.cluster.local port 80 may."},
	} {
		if _, r := b.hello(t, tc.dev, tunnel.Hello{End: tc.id}); r.OK || !strings.HasPrefix(r.Error, tc.want) {
			t.Errorf("%s ends %s: %+v, want %q", tc.dev, tc.id, r, tc.want)
		}
	}
	if b.reg.Get(id) == nil {
		t.Fatal("a refused end ended the session")
	}
	for _, by := range []string{"alice", "bob"} {
		if _, r := b.hello(t, by, tunnel.Hello{End: id}); !r.OK || r.Session != id {
			t.Fatalf("%s ends the session: %+v", by, r)
		}
		if b.reg.Get(id) != nil {
			t.Fatalf("%s ended the session, but it is still registered", by)
		}
		if ev := <-last; ev.Kind != tunnel.EventEnded || !strings.Contains(ev.Error, "ended by") {
			t.Fatalf("the CLI's last event after %s ended it: %+v", by, ev)
		}
		tn.Close()
		tn, id, last = register()
	}
	tn.Close()
	<-last
}
