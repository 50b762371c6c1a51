//go:build linux

package agent

import (
	"reflect"
	"testing"
)

func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name string
		pod  PodInfo
		want Mode
	}{
		{"ambient by annotation", PodInfo{Annotations: map[string]string{"ambient.istio.io/redirection": "enabled"}, Containers: []string{"app"}}, ModeAmbient},
		{"ambient by pod label", PodInfo{Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}, ModeAmbient},
		{"ambient by namespace", PodInfo{NamespaceLabels: map[string]string{"istio.io/dataplane-mode": "ambient"}}, ModeAmbient},
		{"opted out of an ambient namespace", PodInfo{NamespaceLabels: map[string]string{"istio.io/dataplane-mode": "ambient"}, Labels: map[string]string{"istio.io/dataplane-mode": "none"}}, ModeNone},
		{"sidecar container", PodInfo{Containers: []string{"app", "istio-proxy"}}, ModeSidecar},
		{"sidecar status annotation", PodInfo{Annotations: map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`}}, ModeSidecar},
		{"ambient wins over a leftover sidecar annotation", PodInfo{Annotations: map[string]string{"ambient.istio.io/redirection": "enabled", "sidecar.istio.io/status": "{}"}}, ModeAmbient},
		{"no mesh", PodInfo{Containers: []string{"app"}}, ModeNone},
	} {
		if got, why := Detect(tc.pod); got != tc.want {
			t.Errorf("%s: %v (%s), want %v", tc.name, got, why, tc.want)
		}
	}
}

func TestSplitRule(t *testing.T) {
	got := splitRule(`-A OUTPUT -m comment --comment "detour agent" -j DETOUR_OUTPUT`)
	want := []string{"-m", "comment", "--comment", "detour agent", "-j", "DETOUR_OUTPUT"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%q", got)
	}
}
