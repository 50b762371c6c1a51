package waypoint_test

import (
	"net/http"
	"testing"

	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
)

// istioStreamLabels are the labels every waypoint stream of a default/<src> client to the demo
// namespace's <svc> carries, whatever else is known.
func istioStreamLabels(src, svc string) map[string]string {
	return map[string]string{
		"reporter":                      "waypoint",
		"source_principal":              "spiffe://cluster.local/ns/default/sa/" + src,
		"destination_service":           svc + ".demo.svc.cluster.local",
		"destination_service_name":      svc,
		"destination_service_namespace": "demo",
		"connection_security_policy":    "mutual_tls",
	}
}

// The labels Istio's own ambient test queries a waypoint's istio_requests_total by
// (istio tests/integration/ambient/baseline_test.go, buildQuery), so Kiali and Istio's dashboards
// group detour's requests as Envoy's: principals with spiffe://, the source pod found by the
// connection's address, the destination pod that served the request.
func TestRequestMetricsCarryIstioLabels(t *testing.T) {
	b := newHTTPBed(t, route.Port{Name: "http", Port: 80}, nil)
	c, _ := b.httpClient(t, false)
	if code, body, _ := get(t, c, "http://10.96.0.20/labels"); code != http.StatusOK {
		t.Fatalf("GET: %d %s", code, body)
	}
	want := map[string]string{
		"reporter":                       "waypoint",
		"request_protocol":               "http",
		"response_code":                  "200",
		"response_flags":                 "-",
		"connection_security_policy":     "mutual_tls",
		"destination_canonical_service":  "web",
		"destination_canonical_revision": "v1",
		"destination_service":            "web.demo.svc.cluster.local",
		"destination_principal":          "spiffe://cluster.local/ns/demo/sa/web",
		"destination_service_name":       "web",
		"destination_workload":           "web-v1",
		"destination_workload_namespace": "demo",
		"destination_service_namespace":  "demo",
		"destination_app":                "web",
		"destination_version":            "v1",
		"source_canonical_service":       "sleep",
		"source_canonical_revision":      "latest",
		"source_principal":               "spiffe://cluster.local/ns/default/sa/sleep",
		"source_workload":                "sleep",
		"source_workload_namespace":      "default",
		"source_app":                     "sleep",
		"source_version":                 "unknown",
		"source_cluster":                 "unknown",
		"grpc_response_status":           "",
	}
	if got := metrics.Sum(b.m.Requests, want); got != 1 {
		t.Errorf("istio_requests_total with Istio's labels = %v, want 1; series:\n%s", got, series(t, b, "istio_requests_total"))
	}
	if got := metrics.Sum(b.m.Durations, want); got != 1 {
		t.Errorf("istio_request_duration_milliseconds count with Istio's labels = %v, want 1", got)
	}
}

func series(t *testing.T, b *httpBed, name string) string {
	mfs, err := b.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out string
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				out += m.String() + "\n"
			}
		}
	}
	return out
}
