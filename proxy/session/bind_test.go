package session_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	secv1beta1 "istio.io/api/security/v1beta1"

	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// A session's --bind is refused, with CheckBind's words and nothing bound, while Istio config
// detour does not implement would apply to the service; --force binds anyway.
func TestBindRefusedForUnsupportedConfig(t *testing.T) {
	var binds, checks atomic.Int32
	refusal := errors.New("mesh: not binding svc/web: Istio config that detour does not implement applies to it")
	b := newBedWith(t, func(m *session.Manager) {
		m.Bind = func(context.Context, string, string, string) (func(), error) { binds.Add(1); return func() {}, nil }
		m.CheckBind = func(ns, svc string) error {
			checks.Add(1)
			if ns != "demo" || svc != "web" {
				t.Errorf("checked %s/%s", ns, svc)
			}
			return refusal
		}
	}, grant("devs", secv1beta1.AuthorizationPolicy_ALLOW, "cluster.local/ns/dev/sa/alice", "STEAL"))
	spec := steal(tunnel.Filter{Header: "x-dev", HeaderValue: "first"})
	spec.Bind = true
	if _, r := b.hello(t, "alice", tunnel.Hello{Register: &spec}); r.OK || !strings.HasPrefix(r.Error, refusal.Error()) || binds.Load() != 0 {
		t.Fatalf("bind without --force: %+v, %d binds", r, binds.Load())
	}
	spec.Force, spec.Filter.HeaderValue = true, "second" // (the refused one may not be gone yet)
	if _, r := b.hello(t, "alice", tunnel.Hello{Register: &spec}); !r.OK || binds.Load() != 1 || checks.Load() != 1 {
		t.Fatalf("bind with --force: %+v, %d binds, %d checks", r, binds.Load(), checks.Load())
	}
}
