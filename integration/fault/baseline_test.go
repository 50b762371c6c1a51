package fault

import "testing"

// The background load alone: every request succeeds; the healthy memory behind the ceilings.
func TestBaseline(t *testing.T) {
	b := newBed(t, bedOptions{})
	w := b.startWaypoint(selfIP)
	checkLoad(t, b.startLoad(w, loadOptions{}).wait())
	peak, _ := w.mem.Peak()
	t.Logf("healthy waypoint peak RSS under the background load: %d MB", peak>>20)
	t.Logf("healthy waypoint goroutines after the background load: %d", w.goroutines(t))
}

// Memory: the healthy value measured by TestBaseline (peak RSS of the waypoint from its start
// through the background load: 42-51 MB on 2 shared cores), and each attack's ceiling (3x).
const (
	healthyRSS  = 51 << 20
	holCeiling  = 3 * healthyRSS
	loopCeiling = 3 * healthyRSS
)

const (
	helloCeiling = 3 * healthyRSS
	resetCeiling = 3 * healthyRSS
)

const (
	mirrorCeiling    = 3 * healthyRSS
	mirrorGoroutines = 200 // healthy: 30 without a session (TestBaseline); room for a bounded set of mirror copies
)
