package session

import (
	"context"
	"sync"
	"time"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Probing: a stolen request that waits for its response on a reused HTTP connection to the
// developer has no Ack to tell it the developer's side is there. After ProbeAfter without a
// response, the session asks the CLI for an Ack on a probe stream (tunnel.KindProbe, answered
// without touching the app), every ProbeEvery while the wait lasts; a probe that gets no Ack
// within the tunnel's ack bound marks the developer unreachable, so the waiting request goes to
// the real service about a second after the developer vanished, not after the tunnel's dead-peer
// timeout. A slow app never trips it: the CLI answers probes itself.
const (
	ProbeAfter = 300 * time.Millisecond
	ProbeEvery = time.Second
)

// alive is a session's view of whether its developer answers; guarded by its mutex.
type alive struct {
	mu          sync.Mutex
	probing     chan struct{} // closed when the probe in flight ends; nil if none
	err         error         // the last probe's result
	unreachable bool          // the last probe failed and nothing has answered since
}

// Unreachable reports whether the developer's side failed its last probe and nothing has reached
// it since: matched traffic goes to the real service meanwhile (a probe is started to find out
// whether it is back).
func (s *Session) Unreachable() bool {
	s.alive.mu.Lock()
	u := s.alive.unreachable
	s.alive.mu.Unlock()
	if u {
		s.probe()
	}
	return u
}

// reached records that a stream to the developer was acknowledged.
func (s *Session) reached() {
	s.alive.mu.Lock()
	s.alive.unreachable = false
	s.alive.mu.Unlock()
}

// probe starts a probe unless one is in flight and returns a channel closed when it ends; nil
// when the session has ended.
func (s *Session) probe() <-chan struct{} {
	a := &s.alive
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.probing != nil {
		return a.probing
	}
	done := make(chan struct{})
	started := s.Go(func(ctx context.Context) {
		c, err := s.Open(ctx, tunnel.Meta{Kind: tunnel.KindProbe})
		if err == nil {
			c.Close()
		}
		a.mu.Lock()
		a.probing, a.err = nil, err
		a.unreachable = err != nil && ctx.Err() == nil
		a.mu.Unlock()
		close(done)
	})
	if !started {
		return nil
	}
	a.probing = done
	return done
}

// Watch probes the developer's side while a request waits (after ProbeAfter, then every
// ProbeEvery) and calls gone, once, if a probe fails. stop ends the watch, waits for it, and
// reports whether gone was called.
func (s *Session) Watch(gone func()) (stop func() (wasGone bool)) {
	quit := make(chan struct{})
	done := make(chan struct{})
	var fired bool
	if !s.Go(func(ctx context.Context) {
		defer close(done)
		t := time.NewTimer(ProbeAfter)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			p := s.probe()
			if p == nil {
				return
			}
			select {
			case <-quit:
				return
			case <-p:
			}
			s.alive.mu.Lock()
			failed := s.alive.unreachable
			s.alive.mu.Unlock()
			if failed {
				fired = true
				gone()
				return
			}
			t.Reset(ProbeEvery)
		}
	}) {
		close(done)
	}
	var once sync.Once
	return func() bool {
		once.Do(func() { close(quit) })
		<-done
		return fired
	}
}
