package devsession

import (
	"math"
	"time"
)

// Backoff spaces reconnection attempts: the n-th waits Initial·2ⁿ, at most Max, less a random
// part of up to Jitter of it, so that CLIs that lost the same waypoint do not come back in step.
// The zero value is DefaultBackoff.
type Backoff struct {
	Initial time.Duration // the first delay; 0 means 200 ms
	Max     time.Duration // the bound on any delay; 0 means 5 s
	Jitter  float64       // the share of a delay drawn at random, 0 to 1; 0 means 0.5
}

// DefaultBackoff: 200 ms, 400 ms, 800 ms ... up to 5 s, each drawn from its upper half.
var DefaultBackoff = Backoff{Initial: 200 * time.Millisecond, Max: 5 * time.Second, Jitter: 0.5}

// Delay is the wait before attempt n (from 0), for r uniform in [0, 1): within
// [(1-Jitter)·d, d] where d = min(Initial·2ⁿ, Max).
func (b Backoff) Delay(n int, r float64) time.Duration {
	initial, limit, jitter := b.Initial, b.Max, b.Jitter
	if initial <= 0 {
		initial = DefaultBackoff.Initial
	}
	if limit <= 0 {
		limit = DefaultBackoff.Max
	}
	if jitter <= 0 || jitter > 1 {
		jitter = DefaultBackoff.Jitter
	}
	d := limit
	if n < 62 { // 2ⁿ overflows past this
		if f := float64(initial) * math.Exp2(float64(n)); f < float64(limit) {
			d = time.Duration(f)
		}
	}
	r = min(max(r, 0), 1)
	return d - time.Duration(jitter*r*float64(d))
}
