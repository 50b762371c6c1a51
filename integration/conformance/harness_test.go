package conformance

import (
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"sigs.k8s.io/gateway-api/conformance"
)

// TestManifestImages: the image the suite's mesh manifests run is read from the module (one
// image, the suite's echo), and a manifest without a Deployment is an error.
func TestManifestImages(t *testing.T) {
	got, err := manifestImages(conformance.Manifests, "mesh/manifests.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !strings.HasPrefix(got[0], "registry.k8s.io/gateway-api/echo-advanced:") {
		t.Errorf("manifestImages(mesh/manifests.yaml) = %q, want the one echo-advanced image", got)
	}
	fsys := fstest.MapFS{"m.yaml": {Data: []byte("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n")}}
	if _, err := manifestImages(fsys, "m.yaml"); err == nil || err.Error() != "conformance: no Deployment image in m.yaml" {
		t.Errorf("manifestImages(no Deployment) error = %v", err)
	}
}

// TestResultsTable: one row per recorded test, in order, and the counts.
func TestResultsTable(t *testing.T) {
	r := &results{rows: []result{{"MeshBasic", "pass", 1500 * time.Millisecond}, {"MeshPorts", "FAIL", 31 * time.Second}, {"MeshConsumerRoute", "skip", 0}}}
	want := "| test | result | seconds |\n|---|---|---|\n| MeshBasic | pass | 1.5 |\n| MeshPorts | FAIL | 31.0 |\n| MeshConsumerRoute | skip | 0.0 |\n\n1 passed, 1 failed, 1 skipped\n"
	if got := r.table(); got != want {
		t.Errorf("table:\n%s\nwant:\n%s", got, want)
	}
}

// TestRequestsByService: only istio_requests_total of the namespace counts, summed over its
// series per destination service; bad text is an error.
func TestRequestsByService(t *testing.T) {
	text := `# TYPE istio_requests_total counter
istio_requests_total{destination_service_name="echo-v1",destination_service_namespace="gateway-conformance-mesh",response_code="200"} 7
istio_requests_total{destination_service_name="echo-v1",destination_service_namespace="gateway-conformance-mesh",response_code="404"} 2
istio_requests_total{destination_service_name="echo-v2",destination_service_namespace="gateway-conformance-mesh",response_code="200"} 3
istio_requests_total{destination_service_name="infra-backend-v1",destination_service_namespace="gateway-conformance-infra",response_code="200"} 5
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{destination_service_name="echo-v1",destination_service_namespace="gateway-conformance-mesh"} 11
`
	total := map[string]int{"echo-v2": 1} // from another pod
	if err := requestsByService(strings.NewReader(text), "gateway-conformance-mesh", total); err != nil {
		t.Fatal(err)
	}
	if got, want := summary(total), "echo-v1=9 echo-v2=4 (13 in all)"; got != want {
		t.Errorf("requestsByService = %s, want %s", got, want)
	}
	err := requestsByService(strings.NewReader("istio_requests_total{ 1\n"), "x", map[string]int{})
	if err == nil || !strings.HasPrefix(err.Error(), "conformance: parsing detour's metrics: ") {
		t.Errorf("requestsByService(bad text) error = %v", err)
	}
}
