package hbone

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// conn is one HBONE HTTP/2 connection, client or server side. It speaks only what HBONE needs:
// CONNECT streams, flow control, SETTINGS, PING and GOAWAY; no push, no priorities, no trailers.
//
// Goroutines: the reader (readLoop) owns the framer's read side, the HPACK decoder and the wire
// read buffer; the writer (writeLoop) owns the frame buffer, the framer's write side and the HPACK
// encoder. Every other mutable field is guarded by mu. Nothing holds mu across a network write.
//
// DATA frames are read by hand, straight into the stream's receive chunks: no copy through the
// framer, whose read buffer would otherwise keep the largest frame ever seen (1 MiB) per
// connection. The framer reads every other frame, bounded by the header list size.
type conn struct {
	nc   net.Conn // immutable
	srv  bool     // immutable: server side
	cfg  Config   // immutable, defaults applied
	log  *slog.Logger
	fr   *http2.Framer  // read side owned by the reader, write side by the writer
	rd   io.Reader      // the TLS connection, read by the reader
	frd  *replayReader  // feeds the framer a frame header the reader already took
	hdr  [9]byte        // owned by the reader
	tiny [16 << 10]byte // owned by the reader: payloads under 16 KiB land here, then share a chunk
	wr   *frameWriter   // owned by the writer
	wire *wireConn      // batches TLS records under TLS; nil when the transport is not a socket
	henc *hpack.Encoder
	hbuf []byte // owned by the writer: HPACK scratch

	peerID   spiffeid.ID   // immutable: the peer's verified SPIFFE ID, zero if none
	onStream func(*Stream) // server: called by the reader for each accepted CONNECT; starts its handler
	onClose  func(*conn)   // called once when the connection is gone

	mu          sync.Mutex
	streams     map[uint32]*Stream
	nextID      uint32 // client: next stream ID to open
	lastPeerID  uint32 // server: highest stream ID the peer opened
	reserved    int    // client: stream slots promised to dialers but not yet opened
	peerFrame   uint32 // peer's SETTINGS_MAX_FRAME_SIZE
	peerWindow  int32  // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerStreams uint32 // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	sendWin     int64  // connection send window
	recvWin     int64  // bytes the peer may still send on the connection
	recvUnacked int64  // consumed bytes not yet returned by WINDOW_UPDATE
	early       int64  // unread bytes whose connection window was returned on arrival, <= cfg.ConnBuffer
	goAwaySent  bool
	goAwayRecv  bool
	idleSince   time.Time // when the last stream ended; zero while streams are open
	err         error     // why the connection closed; set once

	lastRead atomic.Int64 // unix nanos of the last frame read, for keepalive
	pingSent atomic.Int64 // unix nanos of the unanswered keepalive ping, 0 if none
	written  atomic.Int64 // frames written, for the write-stall check
	writing  atomic.Bool  // the writer has frames in hand

	// Owned by the keepalive timer (checkAlive runs one at a time).
	lastProgress int64
	progressAt   time.Time

	active int         // server, guarded by mu: handlers running, refused past MaxConcurrentStreams
	waste  wasteBudget // server, guarded by mu: streams the peer wasted (budget.go)
	noop   int         // owned by the reader: consecutive frames that carried nothing

	wmu     sync.Mutex  // guards the write queues
	ctrlQ   []writeItem // control frames, written first
	ordQ    []writeItem // HEADERS, DATA and RST_STREAM, in order
	ordCtl  int         // guarded by wmu: items of ordQ counted with ctrlQ against maxQueuedControl
	closing bool        // guarded by wmu: flush the queues, then close
	wake    chan struct{}

	done       chan struct{} // closed when the connection is closed
	writerDone chan struct{} // closed when the writer has exited
	closeOnce  sync.Once
	keepalive  *time.Timer
}

type writeKind uint8

const (
	wData writeKind = iota
	wHeaders
	wRST
	wWindow
	wPing
	wPingAck
	wSettings
	wSettingsAck
	wGoAway
	wTableSize
	wBarrier // writes nothing; its notification tells a writer the queue is past its items
)

// writeItem is one frame for the writer. Data items point into the caller's buffer: the caller
// waits for the notification before it reuses the buffer.
type writeItem struct {
	kind     writeKind
	s        *Stream
	id       uint32
	data     []byte
	end      bool
	notify   bool
	fields   []hpack.HeaderField
	settings []http2.Setting
	code     http2.ErrCode
	n        uint32
	ping     [8]byte
}

func newConn(nc net.Conn, wire *wireConn, srv bool, cfg Config, log *slog.Logger) *conn {
	c := &conn{
		nc:          nc,
		rd:          nc,
		wire:        wire,
		srv:         srv,
		cfg:         cfg,
		log:         log,
		wr:          &frameWriter{w: nc},
		streams:     map[uint32]*Stream{},
		nextID:      1,
		peerFrame:   1 << 14,
		peerWindow:  65535,
		peerStreams: 1<<31 - 1,
		sendWin:     65535,
		recvWin:     int64(cfg.ConnWindow),
		wake:        make(chan struct{}, 1),
		done:        make(chan struct{}),
		writerDone:  make(chan struct{}),
	}
	c.frd = &replayReader{r: nc}
	c.fr = http2.NewFramer(c.wr, c.frd)
	c.fr.SetMaxReadFrameSize(max(1<<14, cfg.MaxHeaderListSize))
	c.fr.MaxHeaderListSize = cfg.MaxHeaderListSize
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(hbufWriter{c})
	c.lastRead.Store(time.Now().UnixNano())
	return c
}

type hbufWriter struct{ c *conn }

func (w hbufWriter) Write(p []byte) (int, error) {
	w.c.hbuf = append(w.c.hbuf, p...)
	return len(p), nil
}

// start sends our preface and SETTINGS and starts the writer and keepalive. The caller then runs
// readLoop.
func (c *conn) start() {
	settings := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: c.cfg.StreamWindow},
		{ID: http2.SettingMaxFrameSize, Val: c.cfg.MaxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: c.cfg.MaxHeaderListSize},
	}
	if c.srv {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.MaxConcurrentStreams})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	}
	c.queueCtrl(writeItem{kind: wSettings, settings: settings})
	if inc := c.cfg.ConnWindow - 65535; inc > 0 {
		c.queueCtrl(writeItem{kind: wWindow, id: 0, n: inc})
	}
	if c.cfg.PingInterval > 0 || c.cfg.IdleTimeout > 0 {
		// Armed only once assigned: checkAlive and close read c.keepalive.
		c.progressAt = time.Now()
		c.keepalive = time.AfterFunc(time.Hour, c.checkAlive)
		c.keepalive.Reset(c.tick())
	}
	go c.writeLoop()
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
	if it.kind != wData || len(it.data) < minUncountedData {
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
		ctrl, c.ctrlQ = c.ctrlQ, ctrl[:0]
		ord, c.ordQ = c.ordQ, ord[:0]
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
				if q[i].notify {
					q[i].s.wrote <- struct{}{}
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
		if it.notify {
			it.s.wrote <- struct{}{}
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
		if n := int64(len(it.data)); n > 0 {
			c.mu.Lock()
			c.growSendWinLocked(n)
			c.mu.Unlock()
		}
		return nil
	}
	var hdr [9]byte
	n := len(it.data)
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
	return err
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

// goAway tells the peer no new streams will be accepted. With streams still open the connection
// stays up for them (graceful); without, or with a protocol error (cause != nil), it closes after
// the GOAWAY is flushed.
func (c *conn) goAway(code http2.ErrCode, cause error) {
	c.mu.Lock()
	already := c.goAwaySent
	c.goAwaySent = true
	last := c.lastPeerID
	open := len(c.streams)
	c.mu.Unlock()
	if !already {
		c.queueCtrl(writeItem{kind: wGoAway, id: last, code: code})
	}
	if cause != nil || open == 0 {
		c.closeAfterFlush(cause)
	}
}

// closeAfterFlush lets the writer flush what is queued, then close. A writer stuck on the network
// is cut off after a second on an error, after the ping timeout on a graceful close.
func (c *conn) closeAfterFlush(cause error) {
	c.mu.Lock()
	if c.err == nil && cause != nil {
		c.err = cause
	}
	c.mu.Unlock()
	c.wmu.Lock()
	c.closing = true
	c.wmu.Unlock()
	c.poke()
	cutoff := c.cfg.PingTimeout
	if cause != nil || cutoff <= 0 {
		cutoff = time.Second
	}
	time.AfterFunc(cutoff, func() { c.close(cause) })
}

// close tears the connection down: every stream fails with err (or ErrConnClosed).
func (c *conn) close(err error) {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		if c.err == nil {
			c.err = err
		}
		if c.err == nil {
			c.err = ErrConnClosed
		}
		streams := c.streams
		c.streams = map[uint32]*Stream{}
		c.mu.Unlock()
		close(c.done)
		c.nc.Close()
		if c.keepalive != nil {
			c.keepalive.Stop()
		}
		for _, s := range streams {
			s.fail(fmt.Errorf("%w: %w", ErrConnClosed, c.err))
		}
		if c.onClose != nil {
			c.onClose(c)
		}
	})
}

// closeErr is the reason the connection closed.
func (c *conn) closeErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

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
			st.pokeWindow()
		}
	}
	return nil
}

// growSendWinLocked adds n to the connection send window. Only writers that found it exhausted
// wait for it, so they are woken only then: a peer sending a WINDOW_UPDATE per byte must not
// cost a pass over every stream per frame.
func (c *conn) growSendWinLocked(n int64) {
	old := c.sendWin
	c.sendWin += n
	if old <= 0 {
		for _, s := range c.streams {
			s.pokeWindow()
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
	s.pokeWindow()
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

// fill reads n payload bytes into s's receive buffer. Large payloads are read straight into
// pooled chunks; small ones go through c.tiny and share the stream's last chunk.
func (c *conn) fill(s *Stream, n int) error {
	for n > 0 {
		if n < len(c.tiny) {
			if _, err := io.ReadFull(c.rd, c.tiny[:n]); err != nil {
				return err
			}
			s.push(c.tiny[:n], false)
			return nil
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

// replayReader hands the framer a frame header the reader already consumed, then the rest.
type replayReader struct {
	hdr []byte
	r   io.Reader
}

func (rr *replayReader) Read(p []byte) (int, error) {
	if len(rr.hdr) > 0 {
		n := copy(p, rr.hdr)
		rr.hdr = rr.hdr[n:]
		return n, nil
	}
	return rr.r.Read(p)
}

// isIdleIDLocked reports whether id names a stream that was never opened.
func (c *conn) isIdleIDLocked(id uint32) bool {
	if c.srv {
		return id%2 == 1 && id > c.lastPeerID
	}
	return id%2 == 1 && id >= c.nextID
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
	s.status = code
	if f.StreamEnded() {
		s.recvEnded = true
	}
	c.mu.Unlock()
	close(s.respCh)
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

// resetStream fails the stream id if it is still open and sends RST_STREAM for it; for a stream
// already closed, only when always is set (a stream error on a frame for a closed stream).
func (c *conn) resetStream(id uint32, code http2.ErrCode, always bool) {
	c.mu.Lock()
	s := c.streams[id]
	if s != nil {
		c.removeLocked(s)
	}
	c.mu.Unlock()
	if s != nil || always {
		c.queueOrdered(writeItem{kind: wRST, s: s, id: id, code: code})
	}
	if s != nil {
		s.fail(&ResetError{Code: code})
	}
}

func (c *conn) newStreamLocked(id uint32) *Stream {
	s := newStream(c, id)
	s.sendWin = int64(c.peerWindow)
	s.recvWin = int64(c.cfg.StreamWindow)
	s.born = c.lastRead.Load()
	c.streams[id] = s
	c.idleSince = time.Time{}
	return s
}

// handlerDone releases the handler slot onHeaders took.
func (c *conn) handlerDone() {
	c.mu.Lock()
	c.active--
	c.mu.Unlock()
}

// maybeRemove forgets s once both directions have ended.
func (c *conn) maybeRemove(s *Stream) {
	c.mu.Lock()
	done := s.recvEnded && s.sentEnd && c.streams[s.id] == s
	if done {
		c.removeLocked(s)
	}
	c.mu.Unlock()
	if done {
		s.finish()
	}
}

func (c *conn) removeLocked(s *Stream) {
	if c.streams[s.id] != s {
		return
	}
	delete(c.streams, s.id)
	if len(c.streams) == 0 {
		c.idleSince = time.Now()
		if c.goAwaySent || c.goAwayRecv {
			go c.closeAfterFlush(nil)
		}
	}
}

// openStream opens a client stream for req: the ID is allocated and HEADERS queued under one
// lock, so IDs reach the wire in increasing order.
func (c *conn) openStream(req *Request) (*Stream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reserved > 0 {
		c.reserved--
	}
	if c.err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConnClosed, c.err)
	}
	if c.goAwayRecv || c.goAwaySent || c.nextID > 1<<31-1 {
		return nil, &ResetError{Code: http2.ErrCodeRefusedStream}
	}
	s := c.newStreamLocked(c.nextID)
	c.nextID += 2
	s.req = req
	s.respCh = make(chan struct{})
	c.wmu.Lock()
	c.appendOrderedLocked(writeItem{kind: wHeaders, s: s, id: s.id, fields: req.fields()})
	c.wmu.Unlock()
	c.poke()
	return s, nil
}

// reserve takes a stream slot for a dialer if the connection can carry one more stream.
func (c *conn) reserve(limit uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.goAwayRecv || c.goAwaySent || c.nextID > 1<<31-1-2*uint32(c.reserved) {
		return false
	}
	if uint32(len(c.streams)+c.reserved) >= min(limit, c.peerStreams) {
		return false
	}
	c.reserved++
	return true
}

// usable reports whether the connection may still open streams.
func (c *conn) usable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil && !c.goAwayRecv
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
		c.mu.Unlock()
		select {
		case <-s.winCh:
		case <-s.wdl.wait():
			return 0, errDeadline
		case <-c.done:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}
