package waypoint_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// loopBed is a waypoint whose route table sends it back to itself: service loop (10.96.0.99:80)
// has one endpoint, 127.0.0.1, whose "ztunnel" port is the waypoint's own listener, and which
// presents the identity expected of it (the waypoint's: its own pods). served counts the
// CONNECTs the waypoint handled.
type loopBed struct {
	addr   string
	served atomic.Int64
	client *hbone.Dialer
	opts   hbone.DialOptions
	m      *metrics.Metrics
	h      *waypoint.Handler
}

func newLoopBed(t *testing.T, services []*route.Service, tweak func(*waypoint.Handler, net.Addr)) *loopBed {
	_, id := testCA(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	services = append(services, &route.Service{Name: "loop", Namespace: "demo", Hostname: "loop.demo.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.99")}, Ports: []route.Port{{Port: 80, TargetPort: 8080}},
		Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("127.0.0.1"), Ready: true, ServiceAccount: "waypoint"}}})
	table, err := route.NewTable(services)
	if err != nil {
		t.Fatal(err)
	}
	wpID := id("spiffe://cluster.local/ns/demo/sa/waypoint")
	onward := &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { onward.Close() })
	b := &loopBed{m: metrics.New(prometheus.NewRegistry())}
	b.h = &waypoint.Handler{Routes: func() *route.Table { return table }, Identity: wpID, Dialer: onward, HBONEPort: port,
		Logger: quiet, Metrics: b.m, ConnectTimeout: 2 * time.Second}
	if tweak != nil {
		tweak(b.h, l.Addr())
	}
	srv := &hbone.Server{TLSConfig: identity.ServerTLS(wpID, nil), Logger: quiet,
		Handler: hbone.HandlerFunc(func(s *hbone.Stream) error { b.served.Add(1); return b.h.ServeHBONE(s) })}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	b.addr = l.Addr().String()
	cliTLS, _ := identity.ClientTLS(id("spiffe://cluster.local/ns/default/sa/sleep"), spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/waypoint"))
	b.opts = hbone.DialOptions{TLSConfig: cliTLS}
	b.client = &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { b.client.Close() })
	return b
}

// connect sends one CONNECT and returns the status it got (200 when accepted).
func (b *loopBed) connect(t *testing.T, target string, opts hbone.DialOptions) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := b.client.Dial(ctx, b.addr, target, opts)
	if err == nil {
		s.Close()
		return 200
	}
	var se *hbone.StatusError
	if !errors.As(err, &se) {
		t.Fatalf("%s: %v", target, err)
	}
	return se.Code
}

// A service whose endpoint is the waypoint itself: without knowing its own addresses the
// waypoint still stops at the second hop (its own hop marker); knowing them, at the first.
func TestForwardingLoopStops(t *testing.T) {
	for _, tc := range []struct {
		name   string
		own    bool
		code   int
		served int64
	}{
		{"hop marker", false, 400, 2},
		{"own listener", true, 503, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newLoopBed(t, nil, func(h *waypoint.Handler, l net.Addr) {
				if tc.own {
					own, err := waypoint.OwnAddresses([]net.Addr{l})
					if err != nil {
						t.Fatal(err)
					}
					h.Own = own
				}
			})
			start := time.Now()
			code := b.connect(t, "10.96.0.99:80", b.opts)
			if code != tc.code || b.served.Load() != tc.served {
				t.Fatalf("got %d after %d CONNECTs (%v), want %d after %d", code, b.served.Load(), time.Since(start).Round(time.Millisecond), tc.code, tc.served)
			}
			if got := testutil.ToFloat64(b.m.Decisions.WithLabelValues("deny", "detour/forwarding-loop")); got != 1 {
				t.Errorf("loops counted: %v, want 1", got)
			}
		})
	}
}

// A CONNECT to the waypoint's own Service VIP or pod IP, or one carrying the hop marker, is
// refused at once (400) without a dial.
func TestConnectToSelfRefused(t *testing.T) {
	own := &route.Service{Name: "detour", Namespace: "demo", Self: true, VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.15")},
		Ports:     []route.Port{{Name: "mesh", Port: 15008, TargetPort: 15008}},
		Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("10.244.0.7"), Ready: true, ServiceAccount: "waypoint"}}}
	b := newLoopBed(t, []*route.Service{own}, func(h *waypoint.Handler, _ net.Addr) {
		o, err := waypoint.OwnAddresses(nil, "10.244.0.8")
		if err != nil {
			t.Fatal(err)
		}
		h.Own = o
	})
	marked := b.opts
	marked.Header = http.Header{waypoint.HopHeader: {"spiffe://cluster.local/ns/demo/sa/waypoint"}}
	for _, tc := range []struct {
		target string
		opts   hbone.DialOptions
	}{
		{"10.96.0.15:15008", b.opts}, // the Service VIP
		{"10.244.0.7:15008", b.opts}, // a replica
		{"10.244.0.8:15009", b.opts}, // this pod (POD_IP), any port
		{"10.96.0.99:80", marked},    // already forwarded by a waypoint
	} {
		if code := b.connect(t, tc.target, tc.opts); code != 400 {
			t.Errorf("%s: %d, want 400", tc.target, code)
		}
	}
	if n := b.served.Load(); n != 4 {
		t.Errorf("%d CONNECTs served, want 4 (nothing dialed)", n)
	}
}

// Only services bound to this waypoint are served: an unbound one is refused (403), by VIP or
// pod IP, and counted.
func TestUnboundServiceRefused(t *testing.T) {
	other := &route.Service{Name: "elsewhere", Namespace: "demo", Unbound: true, VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.16")},
		Ports:     []route.Port{{Port: 80, TargetPort: 8080}},
		Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("127.0.0.9"), Ready: true, ServiceAccount: "elsewhere"}}}
	b := newLoopBed(t, []*route.Service{other}, nil)
	for _, target := range []string{"10.96.0.16:80", "127.0.0.9:8080"} {
		if code := b.connect(t, target, b.opts); code != 403 {
			t.Errorf("%s: %d, want 403", target, code)
		}
	}
	if got := testutil.ToFloat64(b.m.Decisions.WithLabelValues("deny", "detour/not-bound")); got != 2 {
		t.Errorf("refusals counted: %v, want 2", got)
	}
}
