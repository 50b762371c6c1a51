// Package egress gives a developer's local process the cluster's services without root and
// without hooks: an HTTP proxy (CONNECT, and absolute-form requests) and a SOCKS5 proxy on
// loopback, whose connections go out through one HBONE connection to the waypoint, carried by the
// developer tunnel and authenticated with the developer's own SVID: the waypoint, and the
// policies it enforces, see the developer's identity. Names are resolved by the caller's Resolve
// (cluster service names to their VIPs).
package egress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"time"

	socks5 "github.com/things-go/go-socks5"

	"github.com/detour-mesh/detour/hbone"
)

// Proxies serve the local process's outgoing connections.
type Proxies struct {
	// Dial opens a stream to addr (IP:port) over the developer's HBONE connection.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// Resolve maps a host name to an IP (cluster service names); IPs never reach it.
	Resolve func(ctx context.Context, host string) (net.IP, error)
	// Principal is the developer's identity, named in refusals.
	Principal string
	Logger    *slog.Logger

	wg sync.WaitGroup
}

// ErrRefused: the waypoint refused the connection: an AuthorizationPolicy denied the developer,
// the destination is not bound to the waypoint (egress reaches only services bound to it: the
// waypoint would reach any other with its own identity, not the developer's), or the
// destination is the waypoint itself (a loop).
var ErrRefused = errors.New("egress: refused by the waypoint")

// dial resolves host:port and dials it through the tunnel.
func (p *Proxies) dial(ctx context.Context, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if net.ParseIP(host) == nil {
		ip, err := p.Resolve(ctx, host)
		if err != nil {
			return nil, err
		}
		addr = net.JoinHostPort(ip.String(), port)
	}
	c, err := p.Dial(ctx, addr)
	var se *hbone.StatusError
	switch {
	case errors.As(err, &se) && se.Code == http.StatusForbidden:
		return nil, fmt.Errorf("%w: an AuthorizationPolicy denies %s access to %s, or its service is not bound to the waypoint (istio.io/use-waypoint; egress reaches bound services only) (%v)",
			ErrRefused, p.Principal, addr, err)
	case errors.As(err, &se) && se.Code == http.StatusBadRequest:
		return nil, fmt.Errorf("%w: %s is the waypoint itself, or was forwarded by it already (a loop) (%v)", ErrRefused, addr, err)
	}
	return c, err
}

// ServeHTTP is the HTTP proxy: CONNECT tunnels, and plain requests in absolute form.
func (p *Proxies) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect {
		p.connect(w, r)
		return
	}
	if r.URL.Host == "" {
		http.Error(w, "detour egress: this is a proxy; send absolute-form requests", http.StatusBadRequest)
		return
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) { pr.Out.URL = pr.In.URL; pr.Out.Host = pr.In.Host },
		Transport: &http.Transport{
			DialContext:     func(ctx context.Context, _, addr string) (net.Conn, error) { return p.dial(ctx, addr) },
			IdleConnTimeout: 30 * time.Second,
		},
		ErrorHandler: p.proxyError,
	}
	rp.ServeHTTP(w, r)
}

func (p *Proxies) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	code := http.StatusBadGateway
	if errors.Is(err, ErrRefused) {
		code = http.StatusForbidden
	}
	p.log().Info("egress: request failed", "url", r.URL.String(), "err", err)
	http.Error(w, "detour: "+err.Error(), code)
}

func (p *Proxies) connect(w http.ResponseWriter, r *http.Request) {
	up, err := p.dial(r.Context(), r.Host)
	if err != nil {
		p.proxyError(w, r, err)
		return
	}
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		up.Close()
		return
	}
	conn, brw, err := rc.Hijack()
	if err != nil {
		up.Close()
		return
	}
	if n := brw.Reader.Buffered(); n > 0 {
		b, _ := brw.Reader.Peek(n)
		up.Write(b)
	}
	hbone.Splice(conn, up, 0)
}

// Serve runs the HTTP proxy on hl and the SOCKS5 proxy on sl until ctx ends.
func (p *Proxies) Serve(ctx context.Context, hl, sl net.Listener) error {
	hs := &http.Server{Handler: p, ReadHeaderTimeout: 30 * time.Second}
	ss := socks5.NewServer(
		socks5.WithResolver(resolver{p}),
		socks5.WithDial(func(ctx context.Context, _, addr string) (net.Conn, error) { return p.dial(ctx, addr) }),
		socks5.WithLogger(socksLogger{p.log()}),
	)
	stop := context.AfterFunc(ctx, func() { hs.Close(); sl.Close() })
	defer stop()
	errc := make(chan error, 2)
	p.wg.Go(func() { errc <- ignoreClosed(hs.Serve(hl)) })
	p.wg.Go(func() { errc <- ignoreClosed(ss.Serve(sl)) })
	p.wg.Wait()
	return errors.Join(<-errc, <-errc)
}

func ignoreClosed(err error) error {
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

type resolver struct{ p *Proxies }

func (r resolver) Resolve(ctx context.Context, name string) (context.Context, net.IP, error) {
	ip, err := r.p.Resolve(ctx, name)
	return ctx, ip, err
}

type socksLogger struct{ l *slog.Logger }

func (s socksLogger) Errorf(format string, args ...any) {
	s.l.Debug("egress: socks5: " + fmt.Sprintf(format, args...))
}

func (p *Proxies) log() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.Default()
}

// Env is the environment that sends a process's connections through the proxies.
func Env(httpAddr, socksAddr string) []string {
	h, s := "http://"+httpAddr, "socks5h://"+socksAddr
	return []string{"HTTP_PROXY=" + h, "http_proxy=" + h, "HTTPS_PROXY=" + h, "https_proxy=" + h,
		"ALL_PROXY=" + s, "all_proxy=" + s, "NO_PROXY=localhost,127.0.0.1,::1", "no_proxy=localhost,127.0.0.1,::1"}
}
