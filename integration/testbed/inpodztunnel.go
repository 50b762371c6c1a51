package testbed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/detour-mesh/detour/agent"
	"github.com/detour-mesh/detour/hbone"
)

// ztunnel's in-pod listeners (src/config.rs: outbound_addr, inbound_plaintext_addr,
// inbound_addr, all on the wildcard address) and the ports it refuses to proxy to (illegal_ports).
const (
	ztunnelOutbound  = 15001
	ztunnelPlaintext = 15006
	ztunnelHBONE     = 15008
)

// inPodZtunnel stands in for ztunnel serving one ambient pod in in-pod mode: its listeners and
// every socket it dials live in the pod's network namespace with the packet mark InpodMark
// (ztunnel src/inpod/config.rs InPodSocketFactory, src/inpod/statemanager.rs one proxy per pod
// netns). Routes come only from the WorkloadView (istiod's workload xDS). Its goroutines are
// owned: the test's cleanup closes the listeners and every connection and waits for them.
type inPodZtunnel struct {
	pod  *Pod
	view *WorkloadView
	out  *Ztunnel
	srv  *hbone.Server
	ls   []net.Listener  // 15001, 15006, 15008
	ctx  context.Context // cancelled by close
	stop context.CancelFunc
	wg   sync.WaitGroup

	closeOnce sync.Once

	mu    sync.Mutex
	conns map[net.Conn]struct{} // open plain TCP connections, closed by close
	errs  []string              // the first connection failures, for a failing test's log
}

// fail records why a connection was dropped (ztunnel's log_early_deny and access log).
func (z *inPodZtunnel) fail(what string, err error) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if len(z.errs) < 20 {
		z.errs = append(z.errs, what+": "+err.Error())
	}
}

// ServeZtunnel starts the stand-in for pod p with identity id (the pod's service account's
// certificate from istiod's CA, as ztunnel fetches one per pod) until the test ends. Run
// EnrollAmbient first: the stand-in serves what the rules redirect.
func (p *Pod) ServeZtunnel(t testing.TB, id *Workload, view *WorkloadView) {
	t.Helper()
	z, err := startZtunnel(p, id, view)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		z.Close()
		if t.Failed() {
			for _, e := range z.failures() {
				t.Logf("testbed: ztunnel stand-in in pod %s: %s", p.Name, e)
			}
		}
	})
}

// startZtunnel listens on ztunnel's three in-pod ports inside p and serves them until Close.
func startZtunnel(p *Pod, id *Workload, view *WorkloadView) (*inPodZtunnel, error) {
	ctx, stop := context.WithCancel(context.Background())
	z := &inPodZtunnel{pod: p, view: view, ctx: ctx, stop: stop, conns: map[net.Conn]struct{}{}}
	z.out = NewZtunnel(id, z.dialMarked)
	z.srv = &hbone.Server{Handler: hbone.HandlerFunc(z.inboundHBONE), TLSConfig: id.ServerTLS(),
		Logger: slog.New(slog.DiscardHandler)}
	for _, port := range []int{ztunnelOutbound, ztunnelPlaintext, ztunnelHBONE} {
		l, err := p.listenMarked(port)
		if err != nil {
			for _, l := range z.ls {
				l.Close()
			}
			stop()
			return nil, fmt.Errorf("testbed: ztunnel stand-in in pod %s/%s: %w", p.Namespace, p.Name, err)
		}
		z.ls = append(z.ls, l)
	}
	z.wg.Add(3)
	go func() { defer z.wg.Done(); z.accept(z.ls[0], z.outbound) }()
	go func() { defer z.wg.Done(); z.accept(z.ls[1], z.inboundPlaintext) }()
	go func() { defer z.wg.Done(); z.srv.Serve(z.ls[2]) }()
	return z, nil
}

// failures are the first connection failures recorded, for a failing test's log.
func (z *inPodZtunnel) failures() []string {
	z.mu.Lock()
	defer z.mu.Unlock()
	return slices.Clone(z.errs)
}

// Close stops the listeners, closes every connection and waits for the stand-in's goroutines.
// Idempotent.
func (z *inPodZtunnel) Close() {
	z.closeOnce.Do(z.close)
}

func (z *inPodZtunnel) close() {
	z.stop()
	for _, l := range z.ls {
		l.Close()
	}
	z.mu.Lock()
	for c := range z.conns {
		c.Close()
	}
	z.mu.Unlock()
	z.srv.Close()
	z.wg.Wait()
	z.out.Close()
}

// listenMarked listens on the wildcard address inside the pod, the socket marked and
// transparent as ztunnel's are (socket_factory.tcp_bind, maybe_set_transparent).
func (p *Pod) listenMarked(port int) (net.Listener, error) {
	var l net.Listener
	err := p.Do(func() (err error) {
		lc := net.ListenConfig{Control: sockopts(true)}
		l, err = lc.Listen(context.Background(), "tcp", fmt.Sprintf("0.0.0.0:%d", port))
		return err
	})
	return l, err
}

// sockopts sets ztunnel's in-pod mark, and IP_TRANSPARENT when transparent (to bind a source
// address the pod does not own: src/socket.rs set_freebind_and_transparent).
func sockopts(transparent bool) func(_, _ string, rc syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, InpodMark)
			if serr == nil && transparent {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, syscall.IP_TRANSPARENT, 1)
			}
		})
		return errors.Join(err, serr)
	}
}

// dialMarked dials from inside the pod with the mark, so the rules let it out unredirected.
func (z *inPodZtunnel) dialMarked(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := z.pod.Do(func() (err error) {
		d := &net.Dialer{Timeout: 10 * time.Second, Control: sockopts(false)}
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// deliver connects to dst inside the pod from src's address, as freebind_connect does for
// inbound (src/proxy.rs): bound to the original source with IP_TRANSPARENT and the mark, so that
// the app sees the client's address and its replies come back to this socket (the rules'
// connmark 0x111 and the fwmark route to lo). From the pod's own address it dials plainly.
func (z *inPodZtunnel) deliver(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	if src == dst.Addr() {
		return z.dialMarked(ctx, "tcp", dst.String())
	}
	var c net.Conn
	err := z.pod.Do(func() (err error) {
		d := &net.Dialer{Timeout: 10 * time.Second, Control: sockopts(true), LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	return c, err
}

func (z *inPodZtunnel) accept(l net.Listener, serve func(*net.TCPConn)) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		if !z.track(c) {
			c.Close()
			return
		}
		z.wg.Add(1)
		go func() {
			defer z.wg.Done()
			defer z.untrack(c)
			serve(c.(*net.TCPConn))
		}()
	}
}

// splice carries c both ways over up, its onward connection, which close ends with the others.
func (z *inPodZtunnel) splice(c, up net.Conn) {
	if !z.track(up) {
		up.Close()
		return
	}
	defer z.untrack(up)
	hbone.Splice(c, up, 0)
}

// track registers c to be closed by close; false once closing.
func (z *inPodZtunnel) track(c net.Conn) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.ctx.Err() != nil {
		return false
	}
	z.conns[c] = struct{}{}
	return true
}

func (z *inPodZtunnel) untrack(c net.Conn) {
	z.mu.Lock()
	delete(z.conns, c)
	z.mu.Unlock()
	c.Close()
}

// outbound serves a connection the rules redirected to 15001 (src/proxy/outbound.rs proxy:
// the original destination from SO_ORIGINAL_DST, since the in-pod rules REDIRECT outbound).
func (z *inPodZtunnel) outbound(c *net.TCPConn) {
	dst, err := agent.OriginalDst(c)
	if err != nil || selfCall(dst) {
		z.fail("outbound", fmt.Errorf("no original destination or a self call (%v): %v", dst, err))
		return
	}
	src := netip.MustParseAddrPort(c.RemoteAddr().String())
	up, err := z.openOutbound(src, dst)
	if err != nil {
		z.fail("outbound to "+dst.String(), err)
		return
	}
	z.splice(c, up)
}

// openOutbound is build_request and its dial: a destination istiod does not know is passed
// through as plain TCP; a service with a waypoint goes to the waypoint over HBONE with
// authority VIP:port; otherwise to the first endpoint (ztunnel picks one at random), over HBONE
// to its 15008 when its tunnel protocol is HBONE, else plain TCP.
func (z *inPodZtunnel) openOutbound(src, dst netip.AddrPort) (net.Conn, error) {
	baggage := z.view.Baggage(netip.MustParseAddr(z.pod.IP))
	t, ok := z.view.Route(dst)
	switch {
	case !ok:
		return z.dialMarked(z.ctx, "tcp", dst.String())
	case t.Waypoint != "":
		return z.out.Send(z.ctx, Request{Proxy: t.Waypoint, ServerID: t.WaypointIdentity, Authority: t.Authority, Source: src, Host: t.Service, Baggage: baggage})
	case len(t.Endpoints) == 0:
		return nil, fmt.Errorf("testbed: no healthy upstream for %s", dst)
	}
	e := t.Endpoints[0]
	if !e.HBONE {
		return z.dialMarked(z.ctx, "tcp", e.Addr)
	}
	ip := netip.MustParseAddrPort(e.Addr).Addr()
	return z.out.Send(z.ctx, Request{Proxy: netip.AddrPortFrom(ip, ztunnelHBONE).String(), ServerID: e.Identity, Authority: e.Addr, Source: src, Host: t.Service, Baggage: baggage})
}

// inboundHBONE serves a CONNECT on 15008 (src/proxy/inbound.rs build_inbound_request and
// serve_connect): the authority's address must be the pod's own (validate_destination), its port
// is the target (find_inbound_upstream), never one of ztunnel's own; the upstream dial from the
// HBONE peer's address must succeed before the 200.
func (z *inPodZtunnel) inboundHBONE(s *hbone.Stream) error {
	target := s.Request().Target
	local := netip.MustParseAddrPort(s.LocalAddr().String())
	if !target.IsAddr() || target.Addr.Addr() != local.Addr() {
		return fmt.Errorf("%w: %s is not this pod's address %s", hbone.ErrBadAuthority, target, local.Addr())
	}
	if selfCall(target.Addr) {
		return fmt.Errorf("%w: %s is ztunnel's own port", hbone.ErrForbidden, target)
	}
	peer := netip.MustParseAddrPort(s.RemoteAddr().String())
	up, err := z.deliver(s.Context(), peer.Addr(), target.Addr)
	if err != nil {
		z.fail("inbound HBONE to "+target.String(), err)
		return fmt.Errorf("%w: %v", hbone.ErrUnavailable, err)
	}
	if !z.track(up) {
		up.Close()
		return hbone.ErrServerClosed
	}
	defer z.untrack(up)
	if err := s.Accept(); err != nil {
		return err
	}
	return hbone.Splice(s, up, 0)
}

// inboundPlaintext serves a connection the rules redirected to 15006 (src/proxy/
// inbound_passthrough.rs proxy_inbound_plaintext): to its original destination, from its source.
func (z *inPodZtunnel) inboundPlaintext(c *net.TCPConn) {
	dst, err := agent.OriginalDst(c)
	if err != nil || selfCall(dst) {
		z.fail("inbound plaintext", fmt.Errorf("no original destination or a self call (%v): %v", dst, err))
		return
	}
	src := netip.MustParseAddrPort(c.RemoteAddr().String())
	up, err := z.deliver(z.ctx, src.Addr(), dst)
	if err != nil {
		z.fail("inbound plaintext to "+dst.String(), err)
		return
	}
	z.splice(c, up)
}

// selfCall is ztunnel's illegal_ports check: never proxy to its own listeners. ztunnel applies it
// outbound to loopback destinations only; here to any address, since a pod dialling its own IP on
// 15001 is not redirected and would otherwise loop into the listener.
func selfCall(dst netip.AddrPort) bool {
	switch dst.Port() {
	case ztunnelOutbound, ztunnelPlaintext, ztunnelHBONE:
		return true
	}
	return false
}
