package fault

import "testing"

// The background load alone: every request succeeds; the healthy memory behind the ceilings.
func TestBaseline(t *testing.T) {
	b := newBed(t, bedOptions{})
	w := b.startWaypoint(selfIP)
	checkLoad(t, b.startLoad(w, loadOptions{}).wait())
	peak, _ := w.mem.Peak()
	t.Logf("healthy waypoint peak RSS under the background load: %d MB", peak>>20)
}
