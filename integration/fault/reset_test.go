package fault

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// rapidResets is each attacker connection's budget of CONNECT+RST_STREAM pairs.
const rapidResets = 10000

// Rapid reset: CONNECT+RST_STREAM pairs as fast as the socket takes them on 4 connections. Each
// attacker connection gets GOAWAY(ENHANCE_YOUR_CALM) and is closed; other clients are unaffected.
// A second run never reads its sockets: the waypoint's memory stays bounded.
func TestRapidReset(t *testing.T) {
	for _, read := range []bool{true, false} {
		t.Run(map[bool]string{true: "reading", false: "never-reading"}[read], func(t *testing.T) {
			b := newBed(t, bedOptions{})
			w := b.startWaypoint(selfIP)
			bg := b.startLoad(w, loadOptions{})
			var wg sync.WaitGroup
			var mu sync.Mutex
			var lines []string
			calm := 0
			for i := range 4 {
				r := b.dialRaw(t, w.hbone, attackerID, read)
				wg.Go(func() {
					sent, err := r.connectReset(webVIP+":82", rapidResets)
					line := fmt.Sprintf("connection %d: %d pairs written (%v)", i, sent, err)
					if read {
						closed, code := r.closedWith(5 * time.Second)
						line += fmt.Sprintf(", closed by the waypoint %v, GOAWAY %v", closed, code)
						if closed && code != nil && *code == http2.ErrCodeEnhanceYourCalm {
							mu.Lock()
							calm++
							mu.Unlock()
						}
					}
					mu.Lock()
					lines = append(lines, line)
					mu.Unlock()
				})
			}
			wg.Wait()
			for _, l := range lines {
				t.Log(l)
			}
			checkLoad(t, bg.wait())
			w.checkMemory(t, resetCeiling, healthyRSS)
			if read && calm != 4 {
				t.Errorf("%d of 4 attacker connections got GOAWAY ENHANCE_YOUR_CALM and were closed after up to %d CONNECT+RST pairs each", calm, rapidResets)
			}
		})
	}
}
