package waypoint_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

// A dry-run policy (istio.io/dry-run) is evaluated and counted, never enforced: its DENY lets the
// request through, and what it would have decided is in detour_authz_dry_run_decisions_total.
func TestDryRunCountedNotEnforced(t *testing.T) {
	deny := &authz.Policy{Namespace: "demo", Name: "no-admin", DryRun: true, Spec: &secv1beta1.AuthorizationPolicy{
		Action:     secv1beta1.AuthorizationPolicy_DENY,
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
		Rules:      []*secv1beta1.Rule{{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Paths: []string{"/admin*"}}}}}},
	}}
	b := newHTTPBed(t, route.Port{Name: "http-web", Port: 80}, nil, deny)
	c, _ := b.httpClient(t, false)
	for _, path := range []string{"/admin/users", "/"} {
		if code, body, _ := get(t, c, "http://10.96.0.20:80"+path); code != 200 {
			t.Errorf("%s: %d %q, want 200 (a dry-run DENY is never enforced)", path, code, body)
		}
	}
	if got := testutil.ToFloat64(b.m.DryRun.WithLabelValues("deny", "demo/no-admin")); got != 1 {
		t.Errorf("dry-run denials counted: %v, want 1 (the /admin request)", got)
	}
}
