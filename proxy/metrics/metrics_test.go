package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// detour_unsupported_config holds exactly the last set: an object no longer reported leaves it.
func TestSetUnsupported(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.SetUnsupported([]Config{{"VirtualService", "shop", "reviews"}, {"EnvoyFilter", "istio-system", "x"}})
	m.SetUnsupported([]Config{{"VirtualService", "shop", "reviews"}, {"WasmPlugin", "shop", "w"}})
	want := `
# HELP detour_unsupported_config Istio objects that would apply to services bound to this waypoint and that detour does not implement (1 each; not applied).
# TYPE detour_unsupported_config gauge
detour_unsupported_config{kind="VirtualService",name="reviews",namespace="shop"} 1
detour_unsupported_config{kind="WasmPlugin",name="w",namespace="shop"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "detour_unsupported_config"); err != nil {
		t.Error(err)
	}
	var none *Metrics
	none.SetUnsupported([]Config{{"VirtualService", "a", "b"}}) // nil records nothing
}
