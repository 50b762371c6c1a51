package fault

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// raw is an attacker's HBONE connection: TLS with its own identity and HTTP/2 written frame by
// frame (x/net/http2's Framer), so that it can do what no well-behaved client does.
type raw struct {
	t    *testing.T
	conn *tls.Conn
	wmu  sync.Mutex // the writer's half: framer writes, bw, hpack
	bw   *bufio.Writer
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
	next uint32 // the next stream ID

	// What the reader saw (when reading): guarded by mu.
	mu         sync.Mutex
	cond       *sync.Cond
	connWindow int64 // what the waypoint lets us send on the connection
	initWindow int64 // its SETTINGS_INITIAL_WINDOW_SIZE
	streamWin  map[uint32]int64
	status     map[uint32]string // :status of each answered stream
	resets     int               // RST_STREAM frames received
	goAway     *http2.GoAwayFrame
	readErr    error // set once the connection ended
	readDone   chan struct{}
	acks       sync.WaitGroup // the reader's SETTINGS and PING acks, each written by a goroutine
}

// dialRaw connects to the waypoint at addr as id. With read, a goroutine reads every frame (acks
// SETTINGS and PING, counts window credit, answers, resets and GOAWAY; DATA is dropped without
// ever returning window: the streams' reader never reads). Without read, nothing is ever read
// from the socket.
func (b *bed) dialRaw(t *testing.T, addr, id string, read bool) *raw {
	cfg := b.clientTLS(id).Clone()
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r := &raw{t: t, conn: conn, bw: bufio.NewWriterSize(conn, 64<<10), next: 1, connWindow: 65535, initWindow: 65535,
		streamWin: map[uint32]int64{}, status: map[uint32]string{}, readDone: make(chan struct{})}
	r.cond = sync.NewCond(&r.mu)
	r.fr = http2.NewFramer(r.bw, conn)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r.enc = hpack.NewEncoder(&r.hbuf)
	r.write(func() error {
		if _, err := io.WriteString(r.bw, http2.ClientPreface); err != nil {
			return err
		}
		return r.fr.WriteSettings()
	})
	if read {
		go r.readLoop()
		t.Cleanup(func() { conn.Close(); <-r.readDone; r.acks.Wait() })
	} else {
		close(r.readDone)
	}
	return r
}

// write runs fn with the writer's half and flushes; a write error (the waypoint closed the
// connection) is returned, a write stuck for 5 s too.
func (r *raw) write(fn func() error) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	r.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := fn(); err != nil {
		return err
	}
	return r.bw.Flush()
}

// writeNoFlush is write without the flush, for floods (bw flushes itself when full).
func (r *raw) writeNoFlush(fn func() error) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	r.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	return fn()
}

// connectLocked writes a CONNECT to authority with the extra header fields (name, value, ...) and
// returns its stream ID (the caller holds wmu).
func (r *raw) connectLocked(authority string, extra ...string) (uint32, error) {
	id := r.next
	r.next += 2
	r.hbuf.Reset()
	r.enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	r.enc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
	for i := 0; i+1 < len(extra); i += 2 {
		r.enc.WriteField(hpack.HeaderField{Name: extra[i], Value: extra[i+1]})
	}
	return id, r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: r.hbuf.Bytes(), EndHeaders: true})
}

// connect opens a stream to authority, with extra header fields (name, value, ...).
func (r *raw) connect(authority string, extra ...string) (uint32, error) {
	var id uint32
	err := r.write(func() (err error) {
		id, err = r.connectLocked(authority, extra...)
		return err
	})
	return id, err
}

// connectReset writes n CONNECT+RST_STREAM(CANCEL) pairs as fast as the socket takes them and
// returns how many were written before an error (the connection closed, or a write stuck 5 s).
func (r *raw) connectReset(authority string, n int) (int, error) {
	for i := range n {
		err := r.writeNoFlush(func() error {
			id, err := r.connectLocked(authority)
			if err != nil {
				return err
			}
			return r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		})
		if err != nil {
			return i, err
		}
	}
	return n, r.write(func() error { return nil })
}

// send writes n bytes of DATA on stream id within the flow-control credit the waypoint gives,
// waiting for credit (at most 5 s without any).
func (r *raw) send(id uint32, n int) error {
	chunk := make([]byte, 16<<10)
	for n > 0 {
		k, err := r.credit(id, min(n, len(chunk)))
		if err != nil {
			return err
		}
		if err := r.write(func() error { return r.fr.WriteData(id, false, chunk[:k]) }); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// credit takes up to want bytes of window for stream id, waiting for some.
func (r *raw) credit(id uint32, want int) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if r.readErr != nil {
			return 0, r.readErr
		}
		sw, ok := r.streamWin[id]
		if !ok {
			sw = r.initWindow
		}
		if k := min(int64(want), r.connWindow, sw); k > 0 {
			r.connWindow -= k
			r.streamWin[id] = sw - k
			return int(k), nil
		}
		if time.Now().After(deadline) {
			return 0, errors.New("no flow-control credit from the waypoint for 5 s")
		}
		r.waitCond(100 * time.Millisecond)
	}
}

// waitCond waits on cond for at most d (mu held).
func (r *raw) waitCond(d time.Duration) {
	t := time.AfterFunc(d, func() { r.mu.Lock(); r.cond.Broadcast(); r.mu.Unlock() })
	r.cond.Wait()
	t.Stop()
}

func (r *raw) readLoop() {
	defer close(r.readDone)
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.mu.Lock()
			r.readErr = err
			r.cond.Broadcast()
			r.mu.Unlock()
			return
		}
		r.mu.Lock()
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
					r.initWindow = int64(v)
				}
				r.acks.Go(func() { r.write(r.fr.WriteSettingsAck) })
			}
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				r.connWindow += int64(f.Increment)
			} else {
				sw, ok := r.streamWin[f.StreamID]
				if !ok {
					sw = r.initWindow
				}
				r.streamWin[f.StreamID] = sw + int64(f.Increment)
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				data := f.Data
				r.acks.Go(func() { r.write(func() error { return r.fr.WritePing(true, data) }) })
			}
		case *http2.MetaHeadersFrame:
			r.status[f.StreamID] = f.PseudoValue("status")
		case *http2.RSTStreamFrame:
			r.resets++
		case *http2.GoAwayFrame:
			g := *f
			r.goAway = &g
		}
		r.cond.Broadcast()
		r.mu.Unlock()
	}
}

// statusOf is the :status the waypoint answered stream id with ("": none yet).
func (r *raw) statusOf(id uint32) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status[id]
}

// answered waits (at most 5 s) until n streams have a :status, and returns the statuses seen.
func (r *raw) answered(n int) map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for len(r.status) < n && r.readErr == nil && time.Now().Before(deadline) {
		r.waitCond(100 * time.Millisecond)
	}
	out := map[string]int{}
	for _, s := range r.status {
		out[s]++
	}
	return out
}

// closedWith waits (at most wait) until the waypoint closed the connection, and says whether it
// did and with which GOAWAY code (nil: none).
func (r *raw) closedWith(wait time.Duration) (closed bool, goAway *http2.ErrCode) {
	select {
	case <-r.readDone:
	case <-time.After(wait):
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.goAway != nil {
		c := r.goAway.ErrCode
		goAway = &c
	}
	return r.readErr != nil, goAway
}
