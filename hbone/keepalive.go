// Keepalive: a timer, no goroutine while idle; a PING after silence, a close when unanswered or
// when the writer stalls.

package hbone

import (
	"time"

	"golang.org/x/net/http2"
)

// checkAlive runs from the keepalive timer: it pings a connection that has been quiet for a ping
// interval and closes it when a ping stays unanswered for the ping timeout. It runs off the writer
// goroutine so that a writer stuck on a dead peer is still detected. A server also closes a
// connection that has had no stream for the idle timeout.
func (c *conn) checkAlive() {
	now := time.Now()
	if c.cfg.PingInterval > 0 {
		if sent := c.pingSent.Load(); sent != 0 && now.Sub(time.Unix(0, sent)) >= c.cfg.PingTimeout {
			c.close(ErrPingTimeout)
			return
		}
		if c.pingSent.Load() == 0 && now.Sub(time.Unix(0, c.lastRead.Load())) >= c.cfg.PingInterval {
			c.pingSent.Store(now.UnixNano())
			var data [8]byte
			copy(data[:], "detour!!")
			c.queueCtrl(writeItem{kind: wPing, ping: data})
		}
		// A writer that made no progress for a ping timeout while it had frames to send is
		// stuck on a peer that does not read (which may still be sending, so no ping fires).
		progress := c.written.Load()
		if c.writing.Load() && progress == c.lastProgress && now.Sub(c.progressAt) >= c.cfg.PingTimeout {
			c.close(ErrWriteStalled)
			return
		}
		if progress != c.lastProgress || !c.writing.Load() {
			c.lastProgress, c.progressAt = progress, now
		}
	}
	if c.cfg.IdleTimeout > 0 {
		c.mu.Lock()
		idle := !c.idleSince.IsZero() && c.reserved == 0 && now.Sub(c.idleSince) >= c.cfg.IdleTimeout
		c.mu.Unlock()
		if idle {
			c.goAway(http2.ErrCodeNo, nil)
		}
	}
	select {
	case <-c.done:
	default:
		c.keepalive.Reset(c.tick())
	}
}

// tick is how often checkAlive runs.
func (c *conn) tick() time.Duration {
	if c.cfg.PingInterval > 0 {
		return min(c.cfg.PingInterval, c.cfg.PingTimeout)
	}
	return max(c.cfg.IdleTimeout/4, time.Second)
}
