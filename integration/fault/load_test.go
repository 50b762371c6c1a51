package fault

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	istiohbone "istio.io/istio/pkg/hbone"
)

// The background load: ordinary clients, each a workload of its own identity with one HBONE
// connection to the waypoint (Istio's own Go dialer, as a ztunnel would hold one per workload),
// sending HTTP requests (a new stream each, GET on web:80) and TCP requests (a new stream each to
// web:82: the pod's greeting, 512 bytes echoed) at a fixed rate, each with a deadline.

// loadIDs are the background clients' identities: none is an attacker's.
var loadIDs = []string{"spiffe://cluster.local/ns/load/sa/a", "spiffe://cluster.local/ns/load/sa/b"}

type loadOptions struct {
	n        int           // requests; default 150
	every    time.Duration // a request starts every; default 20 ms (50/s: 150 in 3 s)
	deadline time.Duration // per request; default 3 s (a healthy request takes milliseconds)
	// header, when set, goes on every other HTTP request (what a session's filter matches).
	header []string
	// accept are answers accepted besides the pods' ("dev": a developer's app).
	accept []string
}

// load is a running background load; wait returns its results.
type load struct {
	o        loadOptions
	b        *bed
	clients  []*loadClient
	wg       sync.WaitGroup
	mu       sync.Mutex
	results  []result
	inFlight map[int]time.Time // started, not yet ended: request number -> start
}

type result struct {
	i          int
	kind       string // http or tcp
	matched    bool   // carried o.header
	start, end time.Time
	answer     string // the answering app's name
	err        error
}

type loadClient struct {
	id string
	d  istiohbone.Dialer
	b  *bed
}

// startLoad starts the background load against waypoint w.
func (b *bed) startLoad(w *waypoint, o loadOptions) *load {
	o.n = cmp(o.n, 150)
	o.every = cmp(o.every, 20*time.Millisecond)
	o.deadline = cmp(o.deadline, 3*time.Second)
	l := &load{o: o, b: b}
	for _, id := range loadIDs {
		l.clients = append(l.clients, &loadClient{id: id, b: b, d: istioDialer(w, b.clientTLS(id))})
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		tick := time.NewTicker(o.every)
		defer tick.Stop()
		for i := range o.n {
			l.wg.Go(func() { l.one(i) })
			<-tick.C
		}
	}()
	return l
}

// istioDialer is Istio's Go HBONE client to waypoint w with tlsCfg.
func istioDialer(w *waypoint, tlsCfg *tls.Config) istiohbone.Dialer {
	return istiohbone.NewDialer(istiohbone.Config{ProxyAddress: w.hbone, TLS: tlsCfg})
}

func cmp[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// one sends request i: client i%2, HTTP or TCP by turns.
func (l *load) one(i int) {
	c := l.clients[i%len(l.clients)]
	r := result{i: i, kind: "tcp", start: time.Now()}
	if (i/len(l.clients))%2 == 0 {
		r.kind = "http"
		r.matched = len(l.o.header) == 2 && (i/(2*len(l.clients)))%2 == 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.o.deadline)
	defer cancel()
	if r.kind == "http" {
		r.answer, r.err = c.http(ctx, i, r.matched, l.o.header)
	} else {
		r.answer, r.err = c.tcp(ctx, i)
	}
	if r.err == nil && !strings.HasPrefix(r.answer, "pod") && !slices.Contains(l.o.accept, r.answer) {
		r.err = fmt.Errorf("answered by %q", r.answer)
	}
	r.end = time.Now()
	l.mu.Lock()
	l.results = append(l.results, r)
	l.mu.Unlock()
}

// dial opens a stream to target through the waypoint. Istio's dialer ignores its context, so the
// dial runs in a goroutine of the bed's (ended by the waypoint's death at the latest) and a dial
// answered after the deadline is closed.
func (c *loadClient) dial(ctx context.Context, target string) (net.Conn, error) {
	type dialed struct {
		c   net.Conn
		err error
	}
	ch := make(chan dialed)
	c.b.dials.Go(func() {
		conn, err := c.d.DialContext(ctx, "tcp", target)
		select {
		case ch <- dialed{conn, err}:
		case <-ctx.Done():
			if conn != nil {
				conn.Close()
			}
		}
	})
	select {
	case d := <-ch:
		return d.c, d.err
	case <-ctx.Done():
		return nil, fmt.Errorf("CONNECT %s: %w", target, ctx.Err())
	}
}

func (c *loadClient) http(ctx context.Context, i int, matched bool, header []string) (string, error) {
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return c.dial(ctx, addr)
	}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("http://%s:80/load/%d", webVIP, i), nil)
	if matched {
		req.Header.Set(header[0], header[1])
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	name, path, _ := strings.Cut(string(body), " ")
	if resp.StatusCode != 200 || path != fmt.Sprintf("/load/%d", i) {
		return "", fmt.Errorf("HTTP %d %q", resp.StatusCode, body)
	}
	return name, nil
}

func (c *loadClient) tcp(ctx context.Context, i int) (string, error) {
	conn, err := c.dial(ctx, webVIP+":82")
	if err != nil {
		return "", err
	}
	defer conn.Close()
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	s := &tcpStream{Conn: conn, br: bufio.NewReader(conn)}
	name, err := s.greeting()
	if err != nil {
		return "", err
	}
	return name, s.echo(bytes.Repeat([]byte{byte('a' + i%26)}, 512))
}

// tcpSized is tcp with size bytes echoed and its own deadline.
func (c *loadClient) tcpSized(i, size int, deadline time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	conn, err := c.dial(ctx, webVIP+":82")
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(deadline))
	s := &tcpStream{Conn: conn, br: bufio.NewReader(conn)}
	name, err := s.greeting()
	if err != nil {
		return "", err
	}
	return name, s.echo(bytes.Repeat([]byte{byte('a' + i%26)}, size))
}

// tcpStream is a stream to web's TCP port: the pod's greeting, then an echo.
type tcpStream struct {
	net.Conn
	br  *bufio.Reader
	pod string // the greeting
}

func (s *tcpStream) greeting() (string, error) {
	name, err := s.br.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading the greeting: %w", err)
	}
	s.pod = strings.TrimSpace(name)
	return s.pod, nil
}

// echo writes msg (from another goroutine: the pipe is synchronous) and reads it back.
func (s *tcpStream) echo(msg []byte) error {
	werr := make(chan error, 1)
	go func() { _, err := s.Write(msg); werr <- err }()
	got := make([]byte, len(msg))
	_, err := io.ReadFull(s.br, got)
	if err != nil {
		s.Close() // ends the writer
		<-werr
		return fmt.Errorf("reading the echo: %w", err)
	}
	if err := <-werr; err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs")
	}
	return nil
}

// waitEnded waits until n requests have ended (all of them at the latest).
func (l *load) waitEnded(n int) {
	for {
		l.mu.Lock()
		k := len(l.results)
		l.mu.Unlock()
		if k >= min(n, l.o.n) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// wait waits for every request and returns the results in order.
func (l *load) wait() loadResult {
	l.wg.Wait()
	slices.SortFunc(l.results, func(a, b result) int { return a.i - b.i })
	return loadResult{results: l.results}
}

type loadResult struct{ results []result }

// failed are the failed requests among those keep selects (all: nil).
func (r loadResult) failed(keep func(result) bool) []result {
	var out []result
	for _, x := range r.results {
		if x.err != nil && (keep == nil || keep(x)) {
			out = append(out, x)
		}
	}
	return out
}

// String says how many of the background requests failed, by kind, with the first errors.
func (r loadResult) String() string {
	return r.describe(nil)
}

func (r loadResult) describe(keep func(result) bool) string {
	n, by := 0, map[string][2]int{}
	var first []string
	for _, x := range r.results {
		if keep != nil && !keep(x) {
			continue
		}
		n++
		k := by[x.kind]
		k[1]++
		if x.err != nil {
			k[0]++
			if len(first) < 3 {
				first = append(first, fmt.Sprintf("#%d %s: %v", x.i, x.kind, x.err))
			}
		}
		by[x.kind] = k
	}
	s := fmt.Sprintf("%d of %d background requests failed (http %d/%d, tcp %d/%d)",
		by["http"][0]+by["tcp"][0], n, by["http"][0], by["http"][1], by["tcp"][0], by["tcp"][1])
	if len(first) > 0 {
		s += "; first: " + strings.Join(first, "; ")
	}
	return s
}

// checkLoad fails the test unless every background request succeeded.
func checkLoad(t *testing.T, r loadResult) {
	t.Helper()
	if len(r.failed(nil)) > 0 {
		t.Error(r)
	} else {
		t.Log(r)
	}
}
