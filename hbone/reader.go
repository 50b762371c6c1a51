// The reader: the one goroutine that reads frames (readLoop), applies them to the connection and
// its streams, and polices the peer (budgets, queue caps).

package hbone

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// readSettings reads the peer's first frame, which must be SETTINGS (RFC 9113 section 3.4).
func (c *conn) readSettings() error {
	f, err := c.readFrame()
	if err != nil {
		return err
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return connError{http2.ErrCodeProtocol, fmt.Sprintf("first frame is %v, not SETTINGS", f.Header().Type)}
	}
	c.lastRead.Store(time.Now().UnixNano())
	return c.onSettings(sf)
}

// readLoop reads frames until the connection fails. It returns the reason, nil for a clean close.
func (c *conn) readLoop() error {
	for {
		err := c.readOne()
		if err == nil {
			continue
		}
		c.flushPokes()
		var se http2.StreamError
		var ce connError
		var h2ce http2.ConnectionError
		switch {
		case errors.As(err, &se):
			c.resetStream(se.StreamID, se.Code, true)
			if !c.wasteStream() {
				continue
			}
			c.goAway(http2.ErrCodeEnhanceYourCalm, connError{http2.ErrCodeEnhanceYourCalm, "too many streams refused, reset or in error"})
		case errors.As(err, &ce):
			c.goAway(ce.code, err)
		case errors.As(err, &h2ce):
			c.goAway(http2.ErrCode(h2ce), fmt.Errorf("hbone: reading frame: %w", err))
		default:
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				err = nil
			}
			c.close(err)
		}
		<-c.done
		<-c.writerDone
		if errors.Is(c.closeErr(), ErrConnClosed) {
			return nil
		}
		return c.closeErr()
	}
}

// wasteStream counts a stream the reader refused or reset for the peer's fault (a server's
// waste budget, budget.go) and reports whether the peer is past its budget.
func (c *conn) wasteStream() bool {
	if !c.srv {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.waste.waste()
}

func (c *conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return connError{http2.ErrCodeInternal, "DATA reached the framer"}
	case *http2.MetaHeadersFrame:
		c.noop = 0
		return c.onHeaders(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return c.countNoop(c.pingSent.Swap(0) == 0)
		}
		c.queueCtrl(writeItem{kind: wPingAck, ping: f.Data})
	case *http2.RSTStreamFrame:
		return c.onReset(f)
	case *http2.GoAwayFrame:
		c.onGoAway(f)
	case *http2.PushPromiseFrame:
		return connError{http2.ErrCodeProtocol, "PUSH_PROMISE received"}
	default:
		return c.countNoop(true) // PRIORITY and unknown frames are ignored
	}
	return nil
}

// countNoop counts a frame that carried nothing, or resets the count for one that did; a peer
// past maxNoopFrames in a row is cut off.
func (c *conn) countNoop(noop bool) error {
	if !noop {
		c.noop = 0
		return nil
	}
	c.noop++
	if c.noop > maxNoopFrames {
		return connError{http2.ErrCodeEnhanceYourCalm, "too many frames that carry nothing"}
	}
	return nil
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return c.countNoop(true)
	}
	if err := f.ForeachSetting(func(s http2.Setting) error { return s.Valid() }); err != nil {
		return connError{http2.ErrCodeProtocol, err.Error()}
	}
	c.mu.Lock()
	err := f.ForeachSetting(c.applySettingLocked)
	c.mu.Unlock()
	if err != nil {
		return err
	}
	c.queueCtrl(writeItem{kind: wSettingsAck})
	return nil
}

func (c *conn) applySettingLocked(s http2.Setting) error {
	switch s.ID {
	case http2.SettingMaxFrameSize:
		c.peerFrame = s.Val
	case http2.SettingMaxConcurrentStreams:
		c.peerStreams = s.Val
	case http2.SettingHeaderTableSize:
		c.wmu.Lock()
		c.appendOrderedLocked(writeItem{kind: wTableSize, n: min(s.Val, 4096)})
		c.wmu.Unlock()
	case http2.SettingInitialWindowSize:
		delta := int64(s.Val) - int64(c.peerWindow)
		c.peerWindow = int32(s.Val)
		for _, st := range c.streams {
			st.sendWin += delta
			if st.sendWin > 1<<31-1 {
				return connError{http2.ErrCodeFlowControl, "stream window overflow"}
			}
			st.pokeWindowLocked()
		}
	}
	return nil
}

// maxQueuedControl bounds control frames (PING and SETTINGS acks, WINDOW_UPDATE, and the ordered
// items minUncountedData names) waiting for the writer: a peer that floods them without reading
// is cut off (x/net's http2 uses the same bound, counting RST_STREAM for closed streams with
// control frames). The writer holds at most one such batch more, so a connection queues at most
// twice this many frames beyond the large DATA of local writers.
const maxQueuedControl = 10000

// readOne reads and handles one frame. Every frame a peer can make us answer is read here, so
// checking the queues before each read bounds them.
func (c *conn) readOne() error {
	c.wmu.Lock()
	queued := len(c.ctrlQ) + c.ordCtl
	c.wmu.Unlock()
	if queued > maxQueuedControl {
		return connError{http2.ErrCodeEnhanceYourCalm, "too many control frames queued: the peer sends but does not read"}
	}
	if _, err := io.ReadFull(c.rd, c.hdr[:]); err != nil {
		return err
	}
	c.lastRead.Store(time.Now().UnixNano())
	if http2.FrameType(c.hdr[3]) == http2.FrameData {
		return c.readData()
	}
	c.frd.hdr = c.hdr[:]
	f, err := c.fr.ReadFrame()
	if err != nil {
		return err
	}
	return c.handle(f)
}

// readFrame reads one whole frame through the framer (the first SETTINGS).
func (c *conn) readFrame() (http2.Frame, error) {
	c.frd.hdr = nil
	return c.fr.ReadFrame()
}

// readData reads a DATA frame whose header is in c.hdr: flow control first, then the payload
// straight into the stream's chunks (or discarded, for a stream that is gone).
func (c *conn) readData() error {
	h := c.hdr
	length := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
	flags := http2.Flags(h[4])
	id := binary.BigEndian.Uint32(h[5:]) & (1<<31 - 1)
	if length > int(c.cfg.MaxFrameSize) {
		return connError{http2.ErrCodeFrameSize, fmt.Sprintf("DATA of %d bytes", length)}
	}
	if id == 0 {
		return connError{http2.ErrCodeProtocol, "DATA on stream 0"}
	}
	rem, pad := length, 0
	if flags.Has(http2.FlagDataPadded) {
		if rem == 0 {
			return connError{http2.ErrCodeProtocol, "padded DATA without a pad length"}
		}
		var b [1]byte
		if _, err := io.ReadFull(c.rd, b[:]); err != nil {
			return err
		}
		pad, rem = int(b[0]), rem-1
		if pad > rem {
			return connError{http2.ErrCodeProtocol, "DATA padding longer than the frame"}
		}
	}
	end := flags.Has(http2.FlagDataEndStream)
	if err := c.countNoop(length == 0 && !end); err != nil {
		return err
	}
	s, serr := c.admitData(id, int64(length), int64(pad)+int64(length-rem), end)
	var ce connError
	if errors.As(serr, &ce) {
		return serr
	}
	var err error
	if s != nil {
		err = c.fill(s, rem-pad)
	} else {
		_, err = io.CopyN(io.Discard, c.rd, int64(rem-pad))
	}
	if err == nil && pad > 0 {
		_, err = io.CopyN(io.Discard, c.rd, int64(pad))
	}
	if err != nil {
		return err
	}
	if s != nil && end {
		s.push(nil, true)
		c.maybeRemove(s)
	}
	return serr
}

// fill reads n payload bytes into s's receive buffer. Large payloads are read straight into
// pooled chunks; small ones go through a pooled tiny buffer and share the stream's last chunk
// (not read into that chunk directly: its reader may hand it back to the pool meanwhile).
func (c *conn) fill(s *Stream, n int) error {
	for n > 0 {
		if n < tinySize {
			tiny := tinyPool.Get().(*[tinySize]byte)
			_, err := io.ReadFull(c.rd, tiny[:n])
			if err == nil {
				s.push(tiny[:n], false)
			}
			tinyPool.Put(tiny)
			return err
		}
		ch := getChunk()
		k := min(n, len(ch.buf))
		if _, err := io.ReadFull(c.rd, ch.buf[:k]); err != nil {
			putChunk(ch)
			return err
		}
		ch.w = k
		n -= k
		s.pushChunk(ch)
	}
	return nil
}

// tinySize: payloads under it are copied into the stream's last chunk through a tiny buffer.
// The buffer is pooled, not a field of the connection: a connection holds it only while it reads
// such a payload, so an idle connection costs 16 KiB less (BENCHMARKS.md, issue 21 goal 4).
const tinySize = 16 << 10

var tinyPool = sync.Pool{New: func() any { return new([tinySize]byte) }}

// replayReader hands the framer a frame header the reader already consumed, then the rest.
type replayReader struct {
	hdr []byte
	r   io.Reader
}

// isIdleIDLocked reports whether id names a stream that was never opened.
func (c *conn) isIdleIDLocked(id uint32) bool {
	if c.srv {
		return id%2 == 1 && id > c.lastPeerID
	}
	return id%2 == 1 && id >= c.nextID
}

func (c *conn) onHeaders(f *http2.MetaHeadersFrame) error {
	c.mu.Lock()
	if c.err != nil {
		// Closed under the reader (by the writer or the keepalive): no new streams, or they
		// would never be failed.
		c.mu.Unlock()
		return c.err
	}
	s := c.streams[f.StreamID]
	if s != nil {
		c.mu.Unlock()
		if !c.srv && !s.responded {
			return c.onResponse(s, f)
		}
		// Trailers: HBONE sends none, but END_STREAM on them still ends the stream.
		if !f.StreamEnded() {
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
		}
		c.mu.Lock()
		s.recvEnded = true
		c.mu.Unlock()
		s.push(nil, true)
		c.maybeRemove(s)
		return nil
	}
	if !c.srv {
		c.mu.Unlock()
		if c.isIdleIDLocked(f.StreamID) || f.StreamID%2 == 0 {
			return connError{http2.ErrCodeProtocol, "HEADERS on a stream the client never opened"}
		}
		return nil // a response to a stream we already reset
	}
	if f.StreamID%2 == 0 || f.StreamID <= c.lastPeerID {
		c.mu.Unlock()
		return connError{http2.ErrCodeProtocol, "HEADERS with a reused or even stream ID"}
	}
	c.lastPeerID = f.StreamID
	c.waste.open()
	// Handlers count until they return, not until the peer resets their stream: a peer that
	// opens and resets streams in a loop cannot start more than twice the limit
	// (CVE-2023-44487). The slack covers handlers still tearing down streams that just ended.
	if c.goAwaySent || uint32(len(c.streams)) >= c.cfg.MaxConcurrentStreams || uint32(c.active) >= 2*c.cfg.MaxConcurrentStreams {
		c.mu.Unlock()
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeRefusedStream}
	}
	s = c.newStreamLocked(f.StreamID)
	s.recvEnded = f.StreamEnded()
	c.mu.Unlock()

	req, status, err := parseRequest(f.Fields)
	if f.Truncated {
		status, err = http.StatusRequestHeaderFieldsTooLarge, errors.New("hbone: request headers too large")
	}
	if err == nil && f.StreamEnded() {
		status, err = http.StatusBadRequest, errors.New("hbone: CONNECT ended the stream in its headers")
	}
	if err != nil {
		c.log.Debug("hbone: refusing CONNECT", "stream", f.StreamID, "status", status, "err", err)
		s.respond(status)
		return nil
	}
	req.PeerID, req.LocalAddr, req.RemoteAddr = c.peerID, c.nc.LocalAddr(), c.nc.RemoteAddr()
	s.req = req
	c.mu.Lock()
	c.active++
	c.mu.Unlock()
	c.onStream(s) // starts the handler goroutine; calls handlerDone when it returns
	return nil
}

func (c *conn) onResponse(s *Stream, f *http2.MetaHeadersFrame) error {
	code, err := strconv.Atoi(f.PseudoValue("status"))
	if err != nil || code < 100 || code > 999 {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
	}
	if code < 200 {
		return nil // informational
	}
	c.mu.Lock()
	if s.responded {
		c.mu.Unlock()
		return nil
	}
	s.responded = true
	s.status = int32(code)
	if f.StreamEnded() {
		s.recvEnded = true
	}
	respCh := s.respCh
	c.mu.Unlock()
	close(respCh)
	if f.StreamEnded() {
		s.push(nil, true)
		c.maybeRemove(s)
	}
	return nil
}

// onReset ends a stream the peer reset. On a server, a reset before the stream was answered and
// within prematureAge of its opening is premature and counts as waste: the rapid reset attack
// opens and resets streams so that each costs us a handler and the peer nothing.
func (c *conn) onReset(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	tooMuch := false
	if s != nil {
		c.removeLocked(s)
		if c.srv && !s.accepted.Load() && c.lastRead.Load()-s.born < int64(prematureAge) {
			tooMuch = c.waste.waste()
		}
	}
	c.mu.Unlock()
	if s == nil {
		return c.countNoop(true)
	}
	s.fail(&ResetError{Code: f.ErrCode, Remote: true})
	if tooMuch {
		return connError{http2.ErrCodeEnhanceYourCalm, "too many streams reset before their answer"}
	}
	return nil
}

func (c *conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goAwayRecv = true
	var refused []*Stream
	for id, s := range c.streams {
		if !c.srv && id > f.LastStreamID {
			refused = append(refused, s)
			c.removeLocked(s)
		}
	}
	open := len(c.streams)
	c.mu.Unlock()
	for _, s := range refused {
		s.fail(&ResetError{Code: http2.ErrCodeRefusedStream, Remote: true})
	}
	if c.onClose != nil {
		c.onClose(c) // a pool stops handing out this connection
	}
	if open == 0 {
		c.closeAfterFlush(nil)
	}
}

func (rr *replayReader) Read(p []byte) (int, error) {
	if len(rr.hdr) > 0 {
		n := copy(p, rr.hdr)
		rr.hdr = rr.hdr[n:]
		return n, nil
	}
	return rr.r.Read(p)
}
