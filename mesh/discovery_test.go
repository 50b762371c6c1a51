package mesh

import "testing"

// Istio's rules for which waypoint an object uses (ambient/waypoints.go GetUseWaypoint and
// fetchWaypointForTarget).
func TestUseWaypoint(t *testing.T) {
	for _, tc := range []struct {
		name      string
		obj, ns   map[string]string
		wns, want string
		ok        bool
	}{
		{"no label anywhere", nil, nil, "", "", false},
		{"the object's", map[string]string{UseWaypoint: "detour"}, nil, "shop", "detour", true},
		{"the namespace's", nil, map[string]string{UseWaypoint: "detour"}, "shop", "detour", true},
		{"the object's wins", map[string]string{UseWaypoint: "other"}, map[string]string{UseWaypoint: "detour"}, "shop", "other", true},
		{"none on the object opts out", map[string]string{UseWaypoint: "none"}, map[string]string{UseWaypoint: "detour"}, "", "", false},
		{"none on the namespace", nil, map[string]string{UseWaypoint: "none"}, "", "", false},
		{"namespace override on the object", map[string]string{UseWaypoint: "detour", UseWaypointNamespace: "mesh"}, nil, "mesh", "detour", true},
		{"namespace override on the namespace", nil, map[string]string{UseWaypoint: "detour", UseWaypointNamespace: "mesh"}, "mesh", "detour", true},
		{"the namespace's override does not apply to the object's label", map[string]string{UseWaypoint: "detour"}, map[string]string{UseWaypointNamespace: "mesh"}, "shop", "detour", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wns, name, ok := useWaypoint(tc.obj, "shop", tc.ns)
			if wns != tc.wns || name != tc.want || ok != tc.ok {
				t.Fatalf("got %q %q %v, want %q %q %v", wns, name, ok, tc.wns, tc.want, tc.ok)
			}
		})
	}
}
