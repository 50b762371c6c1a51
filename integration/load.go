package integration

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// Load is a bounded test load on one sequence of events, with no clocks: Count requests, one every
// Every, each sent in a goroutine of its own and recorded with the sequence numbers of its start
// and its end; Mark puts the test's own events (a kill, a deletion) on the same sequence, so "in
// flight at the kill" is start < kill < end whatever the machine's load.
type Load[R any] struct {
	Count int
	Every time.Duration
	At    int // the request whose start closes Reached

	reached chan struct{}
	wg      sync.WaitGroup

	mu      sync.Mutex
	seq     int
	samples []Sample[R]
}

// Sample is one request of a Load: its start and end on the sequence and what it returned.
type Sample[R any] struct {
	Start, End int
	Result     R
}

// NewLoad is a Load of count requests, one every every; request at's start closes Reached.
func NewLoad[R any](count int, every time.Duration, at int) *Load[R] {
	return &Load[R]{Count: count, Every: every, At: at, reached: make(chan struct{})}
}

// Run sends the load in the background. For request i, plan is called once its start is on the
// sequence, and returns what sends it (in a goroutine of its own).
func (l *Load[R]) Run(ctx context.Context, plan func(i, start int) func(context.Context) R) {
	l.wg.Go(func() {
		tick := time.NewTicker(l.Every)
		defer tick.Stop()
		for i := range l.Count {
			<-tick.C
			start := l.next()
			send := plan(i, start)
			if i == l.At {
				close(l.reached)
			}
			l.wg.Go(func() {
				r := send(ctx)
				l.mu.Lock()
				defer l.mu.Unlock()
				l.seq++
				l.samples = append(l.samples, Sample[R]{Start: start, End: l.seq, Result: r})
			})
		}
	})
}

func (l *Load[R]) next() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	return l.seq
}

// Reached is closed when request At has started.
func (l *Load[R]) Reached() <-chan struct{} { return l.reached }

// Mark records the current point of the sequence in *at (under the sequence's lock: read *at
// from a plan through Locked).
func (l *Load[R]) Mark(at *int) { l.Locked(func() { l.seq++; *at = l.seq }) }

// Locked runs f under the sequence's lock: for state the test's events and its plan share.
func (l *Load[R]) Locked(f func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f()
}

// Wait waits for every request to end and returns them all.
func (l *Load[R]) Wait() []Sample[R] {
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.samples
}

// Tally is what a load's check counts: requests per class ("phase via outcome") and the failures
// that must not be.
type Tally struct {
	Counts   map[string]int
	Failures []string
}

// Lines are the counts, one sorted line each, the class padded to width.
func (ta *Tally) Lines(width int) string {
	var lines []string
	for k, n := range ta.Counts {
		lines = append(lines, fmt.Sprintf("  %-*s %d", width, k, n))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// Report fails t with each failure (the first 20, then how many more), each after prefix.
func (ta *Tally) Report(t testing.TB, prefix string) {
	t.Helper()
	for i, f := range ta.Failures {
		if i == 20 {
			t.Errorf("... and %d more", len(ta.Failures)-i)
			break
		}
		t.Errorf("%s: %s", prefix, f)
	}
}
