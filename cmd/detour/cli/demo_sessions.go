package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// demoDeveloperSide is developer alice, on her laptop: an app on a loopback port, and detour
// steal and detour mirror of the echo requests that carry her header, run as the commands run.
type demoDeveloperSide struct {
	caDir, tunnel string // the dev CA (alice's identity is minted from it) and the waypoint's tunnel
	client        *demoClient
}

// demoEventWait bounds the wait for a session's live line after its request was answered (the
// waypoint reports a mirror's copy once the laptop answered it).
const demoEventWait = 10 * time.Second

// steal shows requests with x-dev: alice answered by the laptop, and the others by the pods.
func (d *demoDeveloperSide) steal(ctx context.Context, out io.Writer) error {
	app, copies, err := demoLaptopApp()
	if err != nil {
		return err
	}
	defer app.Close()
	sess, err := d.start(ctx, out, "steal", "x-dev=alice", app.Addr().String())
	if err != nil {
		return err
	}
	defer sess.end()
	for _, r := range []struct {
		path string
		dev  bool
	}{{"/cart", true}, {"/cart", false}, {"/checkout", true}} {
		var h http.Header
		what := ""
		if r.dev {
			h, what = http.Header{"X-Dev": {"alice"}}, " (x-dev: alice)"
		}
		code, body, pod, err := d.client.do(ctx, "GET", r.path, h, nil)
		if err != nil {
			return fmt.Errorf("demo: GET %s%s during the steal: %w", r.path, what, err)
		}
		switch {
		case r.dev && pod == "alice's laptop":
			<-copies
			fmt.Fprintf(out, "%s -> GET echo%s%s: %d %q (stolen: %s answered)\n", demoSleep, r.path, what, code, body, pod)
		case !r.dev && strings.HasPrefix(pod, "pod "):
			fmt.Fprintf(out, "%s -> GET echo%s: %d from %s (no x-dev: alice; the real service)\n", demoSleep, r.path, code, pod)
		default:
			return fmt.Errorf("demo: GET %s%s during the steal answered by %q", r.path, what, pod)
		}
	}
	return sess.wait(2)
}

// mirror shows requests with x-dev: alice answered by the pods, with a copy to the laptop.
func (d *demoDeveloperSide) mirror(ctx context.Context, out io.Writer) error {
	app, copies, err := demoLaptopApp()
	if err != nil {
		return err
	}
	defer app.Close()
	sess, err := d.start(ctx, out, "mirror", "x-dev=alice", app.Addr().String())
	if err != nil {
		return err
	}
	defer sess.end()
	for _, body := range []string{`{"item":"book"}`, `{"item":"pen"}`} {
		code, echo, pod, err := d.client.do(ctx, "POST", "/orders", http.Header{"X-Dev": {"alice"}}, []byte(body))
		if err != nil || !strings.HasPrefix(pod, "pod ") || string(echo) != body {
			return fmt.Errorf("demo: POST /orders during the mirror: %d %q from %q: %v", code, echo, pod, err)
		}
		fmt.Fprintf(out, "%s -> POST echo/orders (x-dev: alice): %d from %s (the real answer)\n", demoSleep, code, pod)
		select {
		case c := <-copies:
			fmt.Fprintf(out, "alice's laptop app got a copy: %s\n", c)
		case <-time.After(demoEventWait):
			return errors.New("demo: the laptop got no copy of a mirrored request")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return sess.wait(2)
}

// demoSession is one steal or mirror run as `detour steal|mirror` runs it, its output prefixed.
type demoSession struct {
	cancel context.CancelFunc
	done   chan error
	lines  *lineWatch
}

// start runs the session and returns once the waypoint accepted it.
func (d *demoDeveloperSide) start(ctx context.Context, out io.Writer, mode, header, to string) (*demoSession, error) {
	c := &sessionCmd{mode: mode, namespace: "demo", to: to, headers: []string{header},
		log:    func() *slog.Logger { return slog.New(slog.DiscardHandler) },
		tunnel: tunnelFlags{waypoint: d.tunnel, transport: "quic", caDir: d.caDir, id: demoDeveloper}}
	fmt.Fprintf(out, "%s runs: detour %s svc/echo -n demo --header %s --to %s --waypoint %s --ca %s --id %s\n",
		demoDeveloper, mode, header, to, d.tunnel, d.caDir, demoDeveloper)
	spec, err := c.spec("svc/echo:80")
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	s := &demoSession{cancel: cancel, done: make(chan error, 1), lines: &lineWatch{prefix: "  [detour " + mode + "] ", out: out, seen: make(chan string, 64)}}
	go func() { s.done <- c.run(sctx, spec, s.lines) }()
	verb := map[string]string{"steal": "stealing ", "mirror": "mirroring "}[mode]
	for {
		select {
		case l := <-s.lines.seen:
			if strings.HasPrefix(l, verb) {
				return s, nil
			}
		case err := <-s.done:
			cancel()
			return nil, fmt.Errorf("demo: detour %s: %w", mode, err)
		case <-time.After(15 * time.Second):
			s.end()
			return nil, fmt.Errorf("demo: detour %s did not start", mode)
		}
	}
}

// wait waits for n live lines of requests (the waypoint sends each once it is done).
func (s *demoSession) wait(n int) error {
	deadline := time.After(demoEventWait)
	for n > 0 {
		select {
		case l := <-s.lines.seen:
			if strings.HasPrefix(l, "steal ") || strings.HasPrefix(l, "mirror ") {
				n--
			}
		case err := <-s.done:
			s.done <- err
			return fmt.Errorf("demo: the session ended early: %v", err)
		case <-deadline:
			return errors.New("demo: the session did not report every request")
		}
	}
	return nil
}

// end ends the session as Ctrl-C does, and waits for it.
func (s *demoSession) end() {
	s.cancel()
	<-s.done
}

// lineWatch writes whole lines with a prefix and passes each on (dropped when nobody reads).
type lineWatch struct {
	prefix string
	out    io.Writer
	seen   chan string
	mu     sync.Mutex
	buf    []byte
}

func (w *lineWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		line := string(w.buf[:i])
		w.buf = w.buf[i+1:]
		fmt.Fprintln(w.out, w.prefix+line)
		select {
		case w.seen <- line:
		default:
		}
	}
}

// demoLaptopApp is alice's app: it answers as her laptop and reports each request it gets.
func demoLaptopApp() (net.Listener, <-chan string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, fmt.Errorf("demo: the laptop app: %w", err)
	}
	got := make(chan string, 16)
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<16))
		select {
		case got <- fmt.Sprintf("%s %s (x-dev: %s) %s", r.Method, r.URL.Path, r.Header.Get("X-Dev"), body):
		default:
		}
		w.Header().Set("X-Pod", "alice's laptop")
		fmt.Fprint(w, "hello from alice's laptop")
	})}
	go srv.Serve(l)
	return closerListener{l, srv}, got, nil
}

// closerListener closes its server with it.
type closerListener struct {
	net.Listener
	srv *http.Server
}

func (c closerListener) Close() error { return c.srv.Close() }
