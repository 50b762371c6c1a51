// The writer: the one goroutine that writes frames (writeLoop), from the control queue first and
// then the ordered queue, gathering them into TLS records.

package hbone

import (
	"fmt"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

type writeKind uint8

// writeItem is one frame for the writer. Data items point into the caller's buffer: the caller
// waits for the notification before it reuses the buffer.
type writeItem struct {
	kind     writeKind
	end      bool
	id       uint32
	s        *Stream
	notify   chan bool // when set, the writer sends on it once the item is written (true) or dropped (false)
	data     []byte
	more     [][]byte // DATA only: more payload after data, in the same frame
	fields   []hpack.HeaderField
	settings []http2.Setting
	code     http2.ErrCode
	n        uint32
	ping     [8]byte
}

type hbufWriter struct{ c *conn }

func (w hbufWriter) Write(p []byte) (int, error) {
	w.c.hbuf = append(w.c.hbuf, p...)
	return len(p), nil
}

// queueCtrl queues a control frame; callers may hold mu (the lock order is mu, then wmu).
func (c *conn) queueCtrl(it writeItem) {
	c.wmu.Lock()
	c.ctrlQ = append(c.ctrlQ, it)
	c.wmu.Unlock()
	c.poke()
}

func (c *conn) queueOrdered(it writeItem) {
	c.wmu.Lock()
	c.appendOrderedLocked(it)
	c.wmu.Unlock()
	c.poke()
}

// minUncountedData: a DATA item this large points into the buffer of a local Write, which waits
// until the writer took it, so such items are bounded by what local writers hold (an item costs
// under 12% of the bytes it points to). Every other ordered item (HEADERS, RST_STREAM, small
// DATA, END_STREAM) counts against maxQueuedControl: a peer that answers nothing could
// otherwise grow the queue by one status per request, one RST_STREAM per stream error, or one
// DATA frame per one-byte WINDOW_UPDATE.
const minUncountedData = 1 << 10

// appendOrderedLocked queues it in order; the caller holds wmu.
func (c *conn) appendOrderedLocked(it writeItem) {
	c.ordQ = append(c.ordQ, it)
	if it.kind != wData || it.size() < minUncountedData {
		c.ordCtl++
	}
}

func (c *conn) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeLoop writes queued frames, control frames first, and flushes when the queues run dry, so
// frames queued together leave in one TLS write.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	var ctrl, ord []writeItem
	for {
		c.wmu.Lock()
		ctrl, c.ctrlQ = c.ctrlQ, keepQueue(ctrl)
		ord, c.ordQ = c.ordQ, keepQueue(ord)
		c.ordCtl = 0 // the writer holds them now: at most what the bound let in
		closing := c.closing
		c.wmu.Unlock()
		if len(ctrl)+len(ord) == 0 {
			err := c.flush()
			c.writing.Store(false)
			if err != nil {
				c.close(fmt.Errorf("hbone: writing: %w", err))
				return
			}
			if closing {
				c.close(nil)
				return
			}
			select {
			case <-c.wake:
				continue
			case <-c.done:
				return
			}
		}
		c.writing.Store(true)
		if c.wire != nil {
			c.wire.batch()
		}
		for _, q := range [][]writeItem{ctrl, ord} {
			for i := range q {
				err := c.writeFrame(&q[i])
				c.written.Add(1)
				if q[i].notify != nil {
					q[i].notify <- err == nil
				}
				if err != nil {
					c.close(fmt.Errorf("hbone: writing: %w", err))
					c.notifyAll(q[i+1:])
					return
				}
				q[i] = writeItem{}
			}
		}
	}
}

// maxKeptQueue is the capacity (in items) a write queue keeps between batches: a burst (a
// connection's streams all opening at once) grows a queue past it, and the connection would
// otherwise keep that much for its whole life (BENCHMARKS.md, issue 21 goal 4).
const maxKeptQueue = 64

// keepQueue empties a written queue for reuse, or drops it if a burst made it large.
func keepQueue(q []writeItem) []writeItem {
	if cap(q) > maxKeptQueue {
		return nil
	}
	return q[:0]
}

// flush writes the gathered frames through TLS and the gathered records to the socket.
func (c *conn) flush() error {
	err := c.wr.flush()
	if c.wire != nil {
		if werr := c.wire.release(); err == nil {
			err = werr
		}
	}
	return err
}

// notifyAll releases writers waiting on items that will never be written.
func (c *conn) notifyAll(items []writeItem) {
	for _, it := range items {
		if it.notify != nil {
			it.notify <- false
		}
	}
}

func (c *conn) writeFrame(it *writeItem) error {
	switch it.kind {
	case wData:
		return c.writeData(it)
	case wHeaders:
		return c.writeHeaders(it)
	case wRST:
		if it.s != nil {
			it.s.rstWritten = true
		}
		return c.fr.WriteRSTStream(it.id, it.code)
	case wWindow:
		return c.fr.WriteWindowUpdate(it.id, it.n)
	case wPing:
		return c.fr.WritePing(false, it.ping)
	case wPingAck:
		return c.fr.WritePing(true, it.ping)
	case wSettings:
		return c.fr.WriteSettings(it.settings...)
	case wSettingsAck:
		return c.fr.WriteSettingsAck()
	case wGoAway:
		return c.fr.WriteGoAway(it.id, it.code, nil)
	case wTableSize:
		c.henc.SetMaxDynamicTableSizeLimit(it.n)
	case wBarrier: // nothing to write: writeLoop notifies
	}
	return nil
}

// writeData writes one DATA frame. The frame header is written by hand so that the payload goes
// from the caller's buffer to the frame buffer with no copy into the framer's own.
func (c *conn) writeData(it *writeItem) error {
	s := it.s
	if s.endWritten || s.rstWritten {
		// The stream ended under the writer: drop what is left, and give the connection back
		// the window those bytes had taken.
		if n := int64(it.size()); n > 0 {
			c.mu.Lock()
			c.growSendWinLocked(n)
			c.mu.Unlock()
		}
		return nil
	}
	var hdr [9]byte
	n := it.size()
	hdr[0], hdr[1], hdr[2] = byte(n>>16), byte(n>>8), byte(n)
	hdr[3] = byte(http2.FrameData)
	if it.end {
		hdr[4] = byte(http2.FlagDataEndStream)
		s.endWritten = true
	}
	id := s.id
	hdr[5], hdr[6], hdr[7], hdr[8] = byte(id>>24&0x7f), byte(id>>16), byte(id>>8), byte(id)
	if _, err := c.wr.Write(hdr[:]); err != nil {
		return err
	}
	_, err := c.wr.Write(it.data)
	for _, p := range it.more {
		if err != nil {
			break
		}
		_, err = c.wr.Write(p)
	}
	return err
}

// size is the payload of a DATA item.
func (it *writeItem) size() int {
	n := len(it.data)
	for _, p := range it.more {
		n += len(p)
	}
	return n
}

func (c *conn) writeHeaders(it *writeItem) error {
	if it.s != nil && it.s.rstWritten {
		return nil
	}
	c.hbuf = c.hbuf[:0]
	for _, f := range it.fields {
		if err := c.henc.WriteField(f); err != nil {
			return err
		}
	}
	c.mu.Lock()
	max := int(c.peerFrame)
	c.mu.Unlock()
	block := c.hbuf
	first := block[:min(len(block), max)]
	block = block[len(first):]
	if it.end && it.s != nil {
		it.s.endWritten = true
	}
	err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: it.id, BlockFragment: first, EndStream: it.end, EndHeaders: len(block) == 0})
	for err == nil && len(block) > 0 {
		frag := block[:min(len(block), max)]
		block = block[len(frag):]
		err = c.fr.WriteContinuation(it.id, len(block) == 0, frag)
	}
	return err
}
