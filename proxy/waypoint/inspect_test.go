package waypoint_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// l4Policies are policies on web that need no HTTP attribute and deny the bed's client
// (cluster.local/ns/default/sa/sleep): one DENY, one ALLOW that names someone else.
func l4Policies() map[string]*authz.Policy {
	ref := []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}}
	from := func(p string) []*secv1beta1.Rule {
		return []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Principals: []string{p}}}}}}
	}
	return map[string]*authz.Policy{
		"DENY sleep": {Namespace: "demo", Name: "no-sleep", Spec: &secv1beta1.AuthorizationPolicy{
			Action: secv1beta1.AuthorizationPolicy_DENY, TargetRefs: ref, Rules: from("cluster.local/ns/default/sa/sleep")}},
		"ALLOW curl only": {Namespace: "demo", Name: "curl-only", Spec: &secv1beta1.AuthorizationPolicy{
			TargetRefs: ref, Rules: from("cluster.local/ns/default/sa/curl")}},
	}
}

// With the default inspection, HTTP is parsed where Istio's waypoint parses it: on an undeclared
// port (sniffed) and on a port declared HTTP, a policy that needs no HTTP attribute still
// denies each request with Envoy's 403 "RBAC: access denied" (gRPC: status 7), never with a
// refused CONNECT, and every request is counted.
func TestDefaultInspectDeniesHTTPWith403(t *testing.T) {
	for name, policy := range l4Policies() {
		for _, port := range []route.Port{{Name: "web", Port: 80}, {Name: "http-web", Port: 80}} {
			t.Run(name+"/"+port.Name, func(t *testing.T) {
				b := newHTTPBed(t, port, func(h *waypoint.Handler) { h.Inspect = waypoint.InspectAuto }, policy)
				c1, _ := b.httpClient(t, false)
				if code, body, _ := get(t, c1, "http://10.96.0.20:80/x"); code != 403 || body != "RBAC: access denied" {
					t.Errorf("HTTP/1.1: %d %q, want 403 %q", code, body, "RBAC: access denied")
				}
				c2, _ := b.httpClient(t, true)
				if code, body, _ := get(t, c2, "http://10.96.0.20:80/x"); code != 403 || body != "RBAC: access denied" {
					t.Errorf("h2c: %d %q, want 403 %q", code, body, "RBAC: access denied")
				}
				req, err := http.NewRequest("POST", "http://10.96.0.20:80/pkg.Svc/Call", strings.NewReader("\x00\x00\x00\x00\x00"))
				if err != nil {
					t.Fatal(err)
				}
				req.Header.Set("Content-Type", "application/grpc")
				resp, err := c2.Do(req)
				if err != nil {
					t.Fatalf("gRPC: %v", err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if st, msg := resp.Header.Get("Grpc-Status"), resp.Header.Get("Grpc-Message"); resp.StatusCode != 200 || st != "7" || msg != "RBAC: access denied" {
					t.Errorf("gRPC: HTTP %d grpc-status %q %q, want 200, 7 (PERMISSION_DENIED) %q", resp.StatusCode, st, msg, "RBAC: access denied")
				}
				if got := sum(t, b.reg, "istio_requests_total"); got != 3 {
					t.Errorf("istio_requests_total = %v, want 3", got)
				}
			})
		}
	}
}

// A port declared TCP keeps the opaque path: the same policies refuse the CONNECT itself, and
// so they do on any port with inspect: opaque (detour's opaque-first opt-in).
func TestDefaultInspectRefusesDeclaredTCPAtConnect(t *testing.T) {
	for name, policy := range l4Policies() {
		for _, tc := range []struct {
			port    string
			inspect waypoint.Inspect
		}{{"tcp-web", waypoint.InspectAuto}, {"web", waypoint.InspectOpaque}, {"http-web", waypoint.InspectOpaque}} {
			t.Run(fmt.Sprintf("%s/%s/%d", name, tc.port, tc.inspect), func(t *testing.T) {
				b := newHTTPBed(t, route.Port{Name: tc.port, Port: 80}, func(h *waypoint.Handler) { h.Inspect = tc.inspect }, policy)
				s, err := b.client.Dial(context.Background(), b.waypoint, "10.96.0.20:80", b.opts)
				var se *hbone.StatusError
				if !errors.As(err, &se) || se.Code != 403 {
					if s != nil {
						s.Close()
					}
					t.Fatalf("CONNECT: %v, want a 403", err)
				}
			})
		}
	}
}
