// Package drain is how a waypoint replica ends when Kubernetes deletes its pod: the kubelet sends
// SIGTERM while the pod's endpoint is still being removed (EndpointSlice, then istiod's workload
// xDS, then every ztunnel), so for a while clients still pick this replica. A Drainer fails the
// replica's readiness at once, keeps accepting and serving for Period, tells every HBONE client
// to move its new streams to new connections (GOAWAY), then stops accepting and gives the streams
// still open Timeout to finish before it closes them.
//
// It follows pilot-agent and Envoy (istio pkg/envoy/agent.go terminate: drain_listeners?graceful,
// then terminationDrainDuration, default 5s, before Envoy is stopped; its readiness probe fails
// once the agent's context is cancelled, pilot/cmd/pilot-agent/status/ready/probe.go) and
// ztunnel's drain (src/drain.rs run_with_drain: a graceful drain bounded by a deadline, then a
// forced shutdown; src/proxy/h2/server.rs: graceful_shutdown, a GOAWAY, on each HBONE connection).
package drain

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"
)

// Server is what a Drainer drains (hbone.Server).
type Server interface {
	// Drain tells clients to open their next streams elsewhere, still serving everything.
	Drain()
	// Shutdown stops accepting and waits for open streams until ctx ends, then closes them.
	Shutdown(ctx context.Context) error
}

// Drainer runs one replica's drain. Its zero durations mean none: no period, and what is open
// when the period ends is closed at once.
type Drainer struct {
	Server Server
	// Period is how long the replica keeps accepting after the drain starts, for its endpoint's
	// removal to reach every client.
	Period time.Duration
	// Timeout bounds the wait, after Period, for the streams still open.
	Timeout time.Duration
	Logger  *slog.Logger // nil means slog.Default()

	draining atomic.Bool
}

// Draining reports whether the drain has started: readiness fails from then on.
func (d *Drainer) Draining() bool { return d.draining.Load() }

// Drain drains the server and returns once it has shut down: readiness fails and clients are told
// to move (Server.Drain) at once; after Period, or as soon as ctx ends, the server stops
// accepting and the open streams get Timeout to finish; what is left then is closed. It returns
// nil when every stream finished, ErrTimeout when some had to be closed.
func (d *Drainer) Drain(ctx context.Context) error {
	d.draining.Store(true)
	d.Server.Drain()
	log := d.log()
	log.Info("drain: not ready, still accepting; clients told to move (GOAWAY)", "period", d.Period, "timeout", d.Timeout)
	t := time.NewTimer(d.Period)
	select {
	case <-t.C:
	case <-ctx.Done():
		t.Stop()
	}
	log.Info("drain: no longer accepting; waiting for open streams", "timeout", d.Timeout)
	sctx, cancel := context.WithTimeout(context.Background(), d.Timeout)
	defer cancel()
	started := time.Now()
	err := d.Server.Shutdown(sctx)
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		log.Warn("drain: streams still open after the timeout were closed", "timeout", d.Timeout)
		return ErrTimeout
	case err != nil:
		return err
	}
	log.Info("drain: every stream finished", "after", time.Since(started).Round(time.Millisecond))
	return nil
}

func (d *Drainer) log() *slog.Logger {
	if d.Logger != nil {
		return d.Logger
	}
	return slog.Default()
}
