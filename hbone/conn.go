package hbone

import (
	"fmt"
	"io"
	"log/slog"
	"net"
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
	nc    net.Conn // immutable
	srv   bool     // immutable: server side
	cfg   Config   // immutable, defaults applied
	log   *slog.Logger
	fr    *http2.Framer // read side owned by the reader, write side by the writer
	rd    io.Reader     // the TLS connection, read by the reader
	frd   *replayReader // feeds the framer a frame header the reader already took
	hdr   [9]byte       // owned by the reader
	wr    *frameWriter  // owned by the writer
	wire  *wireConn     // batches TLS records under TLS; nil when the transport is not a socket
	pokes []*Stream     // owned by the reader: streams to wake before it next waits on the socket
	henc  *hpack.Encoder
	hbuf  []byte // owned by the writer: HPACK scratch

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
	noticeSent  bool      // server: the drain notice (GOAWAY 2^31-1) went out; streams are still served
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
	if wire != nil {
		wire.beforeWait = c.flushPokes
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

// notice sends the graceful-shutdown GOAWAY of RFC 9113 section 6.8: last stream ID 2^31-1 and
// NO_ERROR, so the peer opens no new streams here while every stream it already sent, even one
// crossing the notice, is still served (h2's graceful_shutdown, which ztunnel's HBONE server
// calls on drain, sends the same). Unlike goAway it refuses nothing and closes nothing; once, and
// not after goAway.
func (c *conn) notice() {
	c.mu.Lock()
	send := !c.noticeSent && !c.goAwaySent
	c.noticeSent = true
	c.mu.Unlock()
	if send {
		c.queueCtrl(writeItem{kind: wGoAway, id: 1<<31 - 1, code: http2.ErrCodeNo})
	}
}

// noticeIfUsed sends the notice if the peer has opened a stream here; a connection not used yet
// gets it with its first stream (Server.handleStream), so that stream is not refused by the
// peer's own pool.
func (c *conn) noticeIfUsed() {
	c.mu.Lock()
	used := c.lastPeerID > 0
	c.mu.Unlock()
	if used {
		c.notice()
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

// pokeSoon wakes s's reader (and its readable hook) before the connection's reader next waits
// on the socket: the frames of one socket read (up to 256 KiB) then wake each stream once, not
// once per 32 KiB chunk, and a splice forwards them in one batch. Called by the reader; over a
// transport that is not a socket the poke is immediate.
func (c *conn) pokeSoon(s *Stream) {
	if c.wire == nil {
		s.pokeRead()
		return
	}
	if !s.pokeLater {
		s.pokeLater = true
		c.pokes = append(c.pokes, s)
	}
}

// flushPokes wakes the streams pokeSoon deferred. The reader calls it (through the wire) before
// each socket read and when it stops.
func (c *conn) flushPokes() {
	for i, s := range c.pokes {
		s.pokeLater = false
		c.pokes[i] = nil
		s.pokeRead()
	}
	c.pokes = c.pokes[:0]
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
