package session_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	secv1beta1 "istio.io/api/security/v1beta1"

	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// resumable is a Hello from a CLI that resumes sessions.
func resumable(spec tunnel.Spec, resume string) tunnel.Hello {
	return tunnel.Hello{Register: &spec, Version: "v-cli", Protocol: tunnel.Protocol, Capabilities: []string{tunnel.CapResume},
		GraceSeconds: 30, Resume: resume}
}

// waitFor polls cond (the registry changes in the Manager's goroutines) for at most 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A resumable session outlives its lost tunnel, detached; only its holder, with the same spec,
// gets it back, under its ID; a CLI that hangs up (the control stream's EOF) ends it at once.
func TestResume(t *testing.T) {
	b := newBedWith(t, func(m *session.Manager) { m.Version = "v-waypoint" },
		grant("devs", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/*", "STEAL"))
	spec := steal(tunnel.Filter{Header: "x-dev", HeaderValue: "alice"})
	tn, r := b.hello(t, "alice", resumable(spec, ""))
	if !r.OK || r.Version != "v-waypoint" || r.Protocol != tunnel.Protocol || !r.Has(tunnel.CapResume) || r.GraceSeconds != 30 {
		t.Fatalf("registration: %+v", r)
	}
	id := r.Session
	tn.Close() // a QUIC close, not the control stream's EOF: a lost tunnel
	waitFor(t, "the session detached", func() bool { s := b.reg.Get(id); return s != nil && !s.Attached() })

	other := spec
	other.Filter.HeaderValue = "alice2"
	for _, tc := range []struct {
		dev  string
		spec tunnel.Spec
		want string
	}{
		{"bob", spec, "session: session " + id + " is held by another developer"},
		{"alice", other, "session: session " + id + " was registered for web.demo.svc.cluster.local port 80, steal (header x-dev=alice); " +
			"this resume asks for demo/web port 80, steal (header x-dev=alice2)"},
	} {
		if _, r := b.hello(t, tc.dev, resumable(tc.spec, id)); r.OK || r.Error != tc.want {
			t.Errorf("%s resumes %+v: %+v, want %q", tc.dev, tc.spec.Filter, r, tc.want)
		}
	}
	// Someone else's overlapping steal is still refused: the detached session keeps its slot.
	if _, r := b.hello(t, "carol", resumable(spec, "")); r.OK || !strings.Contains(r.Error, "already stolen by spiffe://cluster.local/ns/dev/sa/alice") {
		t.Errorf("an overlapping steal while the session waits: %+v", r)
	}
	tn2, r := b.hello(t, "alice", resumable(spec, id))
	if !r.OK || r.Session != id {
		t.Fatalf("resume: %+v", r)
	}
	if s := b.reg.Get(id); s == nil || !s.Attached() {
		t.Fatal("the resumed session is not attached")
	}
	tn2.Control().(interface{ CloseWrite() error }).CloseWrite() // Ctrl-C
	waitFor(t, "the session ended with its CLI's hang-up", func() bool { return b.reg.Get(id) == nil })
}

// Without a resume within the grace period the session ends; a CLI that announces no resume
// (an older one) loses its session with its tunnel and gets no version fields it would refuse.
func TestGraceEnds(t *testing.T) {
	b := newBedWith(t, func(m *session.Manager) { m.Grace = 300 * time.Millisecond },
		grant("devs", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/*", "STEAL"))
	tn, r := b.hello(t, "alice", resumable(steal(tunnel.Filter{}), ""))
	if !r.OK || r.GraceSeconds != 0 { // 300 ms rounds down to 0 s: the CLI will not count on it
		t.Fatalf("registration: %+v", r)
	}
	tn.Close()
	waitFor(t, "the session ended after its grace", func() bool { return b.reg.Get(r.Session) == nil })

	spec := steal(tunnel.Filter{})
	tn, r = b.hello(t, "alice", tunnel.Hello{Register: &spec})
	if !r.OK || r.Version != "" || r.Protocol != 0 || r.Capabilities != nil {
		t.Fatalf("an older CLI's registration: %+v", r)
	}
	tn.Close()
	waitFor(t, "an older CLI's session ended with its tunnel", func() bool { return b.reg.Get(r.Session) == nil })
}

// A resume of a session no replica holds (the waypoint restarted) registers it anew under its
// ID; an ID of another form is refused.
func TestResumeUnknown(t *testing.T) {
	b := newBed(t, grant("devs", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/*", "STEAL"))
	spec := steal(tunnel.Filter{})
	if _, r := b.hello(t, "alice", resumable(spec, "0123456789ab")); !r.OK || r.Session != "0123456789ab" {
		t.Fatalf("resume of an unknown session: %+v", r)
	}
	if _, r := b.hello(t, "bob", resumable(steal(tunnel.Filter{Header: "x-dev", HeaderValue: "bob"}), "../../x")); r.OK || r.Error != `session: "../../x" is not a session ID` {
		t.Fatalf("resume of a malformed ID: %+v", r)
	}
}

// A CLI of a higher tunnel protocol whose Hello this waypoint cannot read gets one answer naming
// both versions.
func TestVersionSkew(t *testing.T) {
	b := newBedWith(t, func(m *session.Manager) { m.Version = "v1.2.3" })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tn, err := tunnel.Dial(ctx, "quic", b.quicAddr, b.id(t, "spiffe://cluster.local/ns/dev/sa/alice"), nil, quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer tn.Close()
	raw := `{"register":{"namespace":"demo","service":"web","port":80,"mode":"steal","sticky":true},"version":"v9.0.0","protocol":9}`
	frame := binary.BigEndian.AppendUint32(nil, uint32(len(raw)))
	if _, err := tn.Control().Write(append(frame, raw...)); err != nil {
		t.Fatal(err)
	}
	r, err := tunnel.ReadReply(tn.Control())
	want := `version skew: this waypoint runs detour v1.2.3 (tunnel protocol 2) and cannot read the request of a CLI running detour v9.0.0 (tunnel protocol 9): ` +
		`tunnel: decoding a message: json: unknown field "sticky"; use a CLI of the waypoint's version, or upgrade the waypoint`
	if err != nil || r.OK || r.Error != want || r.Version != "v1.2.3" {
		t.Fatalf("reply %+v %v,\nwant %q", r, err, want)
	}
}

// A Reply of a higher protocol this build cannot read is a SkewError naming the peer's version;
// one of this protocol or an older one with an unknown field is an ordinary decoding error.
func TestReadReplySkew(t *testing.T) {
	frame := func(s string) *bytes.Reader {
		return bytes.NewReader(append(binary.BigEndian.AppendUint32(nil, uint32(len(s))), s...))
	}
	_, err := tunnel.ReadReply(frame(`{"ok":true,"version":"v9","protocol":9,"lease":"x"}`))
	if se := (*tunnel.SkewError)(nil); err == nil || !errors.As(err, &se) || se.Version != "v9" || se.Protocol != 9 {
		t.Fatalf("a newer reply: %v", err)
	}
	_, err = tunnel.ReadReply(frame(`{"ok":true,"protocol":2,"lease":"x"}`))
	if se := (*tunnel.SkewError)(nil); err == nil || errors.As(err, &se) || !strings.Contains(err.Error(), `unknown field "lease"`) {
		t.Fatalf("a reply of this protocol with an unknown field: %v", err)
	}
}

// A new registration by the same developer (a new CLI, the old one gone) replaces that developer's
// own session waiting for a resume instead of conflicting with it; another developer's is refused.
func TestNewRegistrationReplacesOwnWaitingSession(t *testing.T) {
	b := newBed(t, grant("devs", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/*", "STEAL"))
	spec := steal(tunnel.Filter{})
	tn, r := b.hello(t, "alice", resumable(spec, ""))
	if !r.OK {
		t.Fatal(r.Error)
	}
	old := r.Session
	tn.Close()
	waitFor(t, "the session detached", func() bool { s := b.reg.Get(old); return s != nil && !s.Attached() })
	if _, r := b.hello(t, "bob", resumable(spec, "")); r.OK || !strings.Contains(r.Error, "already stolen by spiffe://cluster.local/ns/dev/sa/alice (session "+old) {
		t.Fatalf("another developer's steal over a waiting session: %+v", r)
	}
	_, r = b.hello(t, "alice", resumable(spec, ""))
	if !r.OK || r.Session == old {
		t.Fatalf("alice's new registration: %+v", r)
	}
	if b.reg.Get(old) != nil {
		t.Fatal("the waiting session outlived its replacement")
	}
}

// The developer's CLI moved to this replica from the one that held its session (known here as a
// remote session, relayed there): its resume replaces the remote session with a local one of the
// same ID, not a conflict with its own old entry. Another developer cannot take that ID.
func TestResumeTakesOverARemoteSession(t *testing.T) {
	b := newBed(t, grant("devs", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/*", "STEAL"))
	spec := steal(tunnel.Filter{Header: "x-dev", HeaderValue: "alice"})
	remote, err := session.NewRemote("0123456789ab", spec, "web.demo.svc.cluster.local", spiffeid.RequireFromString("spiffe://cluster.local/ns/dev/sa/alice"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.reg.Add(remote); err != nil {
		t.Fatal(err)
	}
	if _, r := b.hello(t, "bob", resumable(steal(tunnel.Filter{Header: "x-dev", HeaderValue: "bob"}), remote.ID)); r.OK || r.Error != "session: the ID 0123456789ab is taken by another session" {
		t.Fatalf("another developer resuming the ID: %+v", r)
	}
	if _, r := b.hello(t, "alice", resumable(spec, remote.ID)); !r.OK || r.Session != remote.ID {
		t.Fatalf("the holder's resume: %+v", r)
	}
	if s := b.reg.Get(remote.ID); s == nil || s.Remote || !s.Attached() || len(b.reg.For("demo", "web", 80)) != 1 {
		t.Fatalf("after the resume: %+v, %d sessions on the port", s, len(b.reg.For("demo", "web", 80)))
	}
}
