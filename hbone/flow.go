// Flow control: the send windows writers wait on, and the receive windows returned to the peer
// (on arrival within ConnBuffer, else on read).

package hbone

import (
	"context"
	"fmt"

	"golang.org/x/net/http2"
)

// growSendWinLocked adds n to the connection send window. Only writers that found it exhausted
// wait for it, so they are woken only then: a peer sending a WINDOW_UPDATE per byte must not
// cost a pass over every stream per frame.
func (c *conn) growSendWinLocked(n int64) {
	old := c.sendWin
	c.sendWin += n
	if old <= 0 {
		for _, s := range c.streams {
			s.pokeWindowLocked()
		}
	}
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		c.growSendWinLocked(int64(f.Increment))
		if c.sendWin > 1<<31-1 {
			return connError{http2.ErrCodeFlowControl, "connection window overflow"}
		}
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		return c.countNoop(true) // closed streams may still get updates, a few
	}
	s.sendWin += int64(f.Increment)
	if s.sendWin > 1<<31-1 {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	s.pokeWindowLocked()
	return nil
}

// admitData applies flow control to a DATA frame of n bytes (waste of them padding) and returns
// the stream to deliver it to, or nil with the error to report once the payload is consumed.
func (c *conn) admitData(id uint32, n, waste int64, end bool) (*Stream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n > c.recvWin {
		return nil, connError{http2.ErrCodeFlowControl, "DATA beyond the connection window"}
	}
	c.recvWin -= n
	s := c.streams[id]
	if s == nil {
		c.creditConnLocked(n)
		if c.isIdleIDLocked(id) {
			return nil, connError{http2.ErrCodeProtocol, "DATA on an idle stream"}
		}
		return nil, nil // a stream we closed or reset: its frames in flight are ignored (RFC 9113 5.1)
	}
	if s.recvEnded || !c.srv && !s.responded {
		c.creditConnLocked(n)
		return nil, http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	}
	if n > s.recvWin {
		c.creditConnLocked(n)
		return nil, http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	}
	s.recvWin -= n
	c.arrivedLocked(s, n-waste)
	if waste > 0 {
		// Padding is never read by anyone: return it to both windows now.
		c.creditConnLocked(waste)
		s.recvWin += waste
		if !end {
			c.queueCtrl(writeItem{kind: wWindow, id: s.id, n: uint32(waste)})
		}
	}
	if end {
		s.recvEnded = true
	}
	return s, nil
}

// creditConnLocked returns n bytes to the peer's connection window, batching the WINDOW_UPDATE.
func (c *conn) creditConnLocked(n int64) {
	c.recvUnacked += n
	if c.recvUnacked >= int64(c.cfg.ConnWindow)/4 {
		c.queueCtrl(writeItem{kind: wWindow, id: 0, n: uint32(c.recvUnacked)})
		c.recvWin += c.recvUnacked
		c.recvUnacked = 0
	}
}

// arrivedLocked accounts n bytes arriving for s's buffer. The connection window for them goes
// back to the peer at once while the connection's early bytes fit cfg.ConnBuffer: the stream
// window (which the peer must respect, admitData) bounds what one stream buffers, so a stream
// whose reader stalls stalls only itself instead of holding the window every other stream of
// the connection needs. Past the budget, the window goes back when the bytes are read, so a
// connection never buffers more than ConnWindow + ConnBuffer unread bytes (MaxConcurrentStreams x
// StreamWindow, up to 4 GiB on a server, would be no bound at all).
func (c *conn) arrivedLocked(s *Stream, n int64) {
	if n <= 0 {
		return
	}
	if c.early+n > int64(c.cfg.ConnBuffer) {
		s.late += n
		return
	}
	c.early += n
	s.early += n
	c.creditConnLocked(n)
}

// releaseLocked accounts n bytes leaving s's buffer (read, or dropped with the stream): window
// still held for them is returned now, budget taken by early ones is freed. Held window goes
// first, so a stalled connection moves again as soon as possible.
func (c *conn) releaseLocked(s *Stream, n int64) {
	late := min(n, s.late)
	s.late -= late
	s.early -= n - late
	c.early -= n - late
	if late > 0 {
		c.creditConnLocked(late)
	}
}

// credit returns n consumed bytes of s to the peer's windows.
func (c *conn) credit(s *Stream, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.releaseLocked(s, int64(n))
	if s.recvEnded || c.streams[s.id] != s {
		return
	}
	s.recvUnacked += int64(n)
	if s.recvUnacked >= int64(c.cfg.StreamWindow)/4 {
		c.queueCtrl(writeItem{kind: wWindow, id: s.id, n: uint32(s.recvUnacked)})
		s.recvWin += s.recvUnacked
		s.recvUnacked = 0
	}
}

// sendWindow blocks until s may send, and takes up to want bytes of both windows.
func (c *conn) sendWindow(ctx context.Context, s *Stream, want int) (int, error) {
	for {
		c.mu.Lock()
		if c.err != nil {
			err := c.err
			c.mu.Unlock()
			return 0, fmt.Errorf("%w: %w", ErrConnClosed, err)
		}
		if err := s.writeErrLocked(); err != nil {
			c.mu.Unlock()
			return 0, err
		}
		n := min(s.sendWin, c.sendWin, int64(c.peerFrame), int64(want))
		if n > 0 {
			s.sendWin -= n
			c.sendWin -= n
			c.mu.Unlock()
			return int(n), nil
		}
		winCh := s.winChLocked()
		c.mu.Unlock()
		select {
		case <-winCh:
		case <-s.wdl.wait():
			return 0, errDeadline
		case <-c.done:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}
