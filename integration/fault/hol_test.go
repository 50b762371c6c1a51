package fault

import (
	"fmt"
	"sync"
	"testing"
)

const attackerID = "spiffe://cluster.local/ns/attacker/sa/mallory"

// Head-of-line blocking across clients: one client opens 40 streams on 4 HBONE connections to
// web's TCP port, sends about 1 MiB on each and never reads (never returns window), or sends
// nothing and never reads. Other identities' requests to the same pods all succeed meanwhile.
func TestHeadOfLine(t *testing.T) {
	for _, tc := range []struct {
		name string
		send int
	}{{"1MiB-unread", 1 << 20}, {"idle-unread", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, bedOptions{})
			w := b.startWaypoint(selfIP)
			bg := b.startLoad(w, loadOptions{})
			var wg sync.WaitGroup
			errs := make(chan error, 40)
			for range 4 {
				r := b.dialRaw(t, w.hbone, attackerID, true)
				for range 10 {
					id, err := r.connect(webVIP + ":82")
					if err != nil {
						t.Fatal(err)
					}
					if tc.send > 0 {
						wg.Go(func() {
							if err := r.send(id, tc.send); err != nil {
								errs <- fmt.Errorf("stream %d: %w", id, err)
							}
						})
					}
				}
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Logf("attacker: %v", err) // the waypoint may well cut an abuser off
			}
			checkLoad(t, bg.wait())
			w.checkMemory(t, holCeiling, healthyRSS)
		})
	}
}
