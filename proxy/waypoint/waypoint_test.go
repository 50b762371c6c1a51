package waypoint_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/metrics"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

var quiet = slog.New(slog.DiscardHandler)

type bed struct {
	ca       *devca.CA
	waypoint string
	client   *hbone.Dialer
	opts     hbone.DialOptions
	mu       sync.Mutex
	hits     map[string]int
	fwd      []string
	onward   []onwardStream
	wpID     identity.Source
}

// onwardStream is what a backend saw of one stream: the original client (Forwarded) and the
// onward connection it came on.
type onwardStream struct{ forwarded, conn string }

func (b *bed) id(t *testing.T, id string) identity.Source {
	svid, err := b.ca.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return identity.Static(&identity.Identity{SVID: svid, Bundle: b.ca.Bundle()})
}

// newBed runs three backend "ztunnels" on 127.0.0.2-4 (a fourth endpoint, 127.0.0.5, is dead),
// and detour's waypoint for service echo (10.96.0.10:80 -> 8080).
func newBed(t *testing.T, endpointSA string) *bed { return newBedWith(t, endpointSA, nil) }

func newBedWith(t *testing.T, endpointSA string, tweak func(*waypoint.Handler)) *bed {
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	b := &bed{ca: ca, hits: map[string]int{}}
	// A port free on 127.0.0.2 is almost surely free on .3 and .4 too.
	probe, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	port := probe.Addr().(*net.TCPAddr).Port
	probe.Close()
	backendID := b.id(t, "spiffe://cluster.local/ns/demo/sa/echo")
	for i := 2; i <= 4; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			t.Skipf("port %d not free on %s: %v", port, ip, err)
		}
		srv := &hbone.Server{TLSConfig: identity.ServerTLS(backendID, nil), Logger: quiet,
			Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
				if s.Request().Target.String() != ip+":8080" {
					return fmt.Errorf("%w: wrong authority %s", hbone.ErrBadAuthority, s.Request().Target)
				}
				b.mu.Lock()
				b.hits[ip]++
				b.fwd = append(b.fwd, s.Request().Forwarded)
				b.onward = append(b.onward, onwardStream{s.Request().Forwarded, ip + "<-" + s.Request().RemoteAddr.String()})
				b.mu.Unlock()
				s.Accept()
				io.WriteString(s, ip+" ")
				_, err := io.Copy(s, s)
				s.CloseWrite()
				return err
			})}
		go srv.Serve(l)
		t.Cleanup(func() { srv.Close() })
	}
	var eps []route.Endpoint
	for i := 2; i <= 5; i++ {
		eps = append(eps, route.Endpoint{IP: netip.MustParseAddr(fmt.Sprintf("127.0.0.%d", i)), Ready: true, ServiceAccount: endpointSA})
	}
	table, err := route.NewTable([]*route.Service{{Name: "echo", Namespace: "demo", Hostname: "echo.demo.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")}, Ports: []route.Port{{Name: "tcp", Port: 80, TargetPort: 8080}}, Endpoints: eps}})
	if err != nil {
		t.Fatal(err)
	}
	wpID := b.id(t, "spiffe://cluster.local/ns/demo/sa/waypoint")
	b.wpID = wpID
	onward := &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { onward.Close() })
	h := &waypoint.Handler{Routes: func() *route.Table { return table }, Balancer: &route.Balancer{}, Identity: wpID,
		Dialer: onward, HBONEPort: uint16(port), Logger: quiet}
	if tweak != nil {
		tweak(h)
	}
	b.waypoint = serveWaypoint(t, h, wpID)
	b.opts = b.clientOpts(t, "spiffe://cluster.local/ns/default/sa/sleep")
	b.client = &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { b.client.Close() })
	return b
}

// clientOpts are the dial options of a client with identity id.
func (b *bed) clientOpts(t *testing.T, id string) hbone.DialOptions {
	cliTLS, _ := identity.ClientTLS(b.id(t, id), spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/waypoint"))
	return hbone.DialOptions{TLSConfig: cliTLS, LocalID: id, Forwarded: `for="10.1.1.1:1234"`, Baggage: "k8s.namespace.name=default"}
}

func (b *bed) roundTrip(ctx context.Context, target, msg string) (string, error) {
	s, err := b.client.Dial(ctx, b.waypoint, target, b.opts)
	if err != nil {
		return "", err
	}
	defer s.Close()
	io.WriteString(s, msg)
	s.CloseWrite()
	got, err := io.ReadAll(s)
	return string(got), err
}

func TestForwardSpreadsAndSkipsDeadEndpoint(t *testing.T) {
	b := newBed(t, "echo")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 40 {
		got, err := b.roundTrip(ctx, "10.96.0.10:80", fmt.Sprint("req", i))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if want := fmt.Sprint(" req", i); len(got) < len(want) || got[len(got)-len(want):] != want {
			t.Fatalf("request %d: got %q", i, got)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for ip, n := range b.hits {
		if n < 10 {
			t.Errorf("%s got %d of 40 streams: %v", ip, n, b.hits)
		}
	}
	if len(b.hits) != 3 {
		t.Errorf("hits %v", b.hits)
	}
	for _, f := range b.fwd {
		if f != `for="10.1.1.1:1234"` {
			t.Fatalf("Forwarded not passed on: %q", f)
		}
	}
}

func TestUnknownTargets(t *testing.T) {
	b := newBed(t, "echo")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, target := range []string{"10.96.0.10:81", "10.96.9.9:80"} {
		_, err := b.roundTrip(ctx, target, "x")
		var se *hbone.StatusError
		if !errors.As(err, &se) || se.Code != 503 {
			t.Errorf("%s: got %v, want 503", target, err)
		}
	}
}

// An endpoint whose ztunnel presents another identity is never used.
func TestOnwardIdentityChecked(t *testing.T) {
	b := newBed(t, "someone-else")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := b.roundTrip(ctx, "10.96.0.10:80", "x")
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code < 500 {
		t.Fatalf("got %v, want a 5xx", err)
	}
	if len(b.hits) != 0 {
		t.Fatalf("a backend with the wrong identity got traffic: %v", b.hits)
	}
}

func TestAuthorizationPolicyDenies(t *testing.T) {
	b := newBedWith(t, "echo", func(h *waypoint.Handler) {
		engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{{
			Namespace: "demo", Name: "only-prod",
			Spec: &secv1beta1.AuthorizationPolicy{
				TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "echo"}},
				Rules:      []*secv1beta1.Rule{{From: []*secv1beta1.Rule_From{{Source: &secv1beta1.Source{Namespaces: []string{"prod"}}}}}},
			},
		}})
		h.Policies = func() *authz.Engine { return engine }
	})
	_, err := b.roundTrip(context.Background(), "10.96.0.10:80", "x")
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != 403 {
		t.Fatalf("got %v, want 403", err)
	}
	if len(b.hits) != 0 {
		t.Fatal("a denied stream reached a backend")
	}
}

// Metrics scraped after the traffic match it: streams opened and closed, bytes each way, and the
// policy decisions.
func TestMetricsMatchTraffic(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	b := newBedWith(t, "echo", func(h *waypoint.Handler) {
		h.Metrics = m
		engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, nil)
		h.Policies = func() *authz.Engine { return engine }
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var sent, got int
	for i := range 12 {
		msg := fmt.Sprint("request-", i)
		reply, err := b.roundTrip(ctx, "10.96.0.10:80", msg)
		if err != nil {
			t.Fatal(err)
		}
		sent += len(msg)
		got += len(reply)
	}
	// The waypoint records a stream when its splice ends, just after the client saw the end.
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(m.Active) != 0 || sum(t, reg, "istio_tcp_connections_closed_total") < 12 {
		if time.Now().After(deadline) {
			t.Fatal("streams never recorded as closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for name, want := range map[string]float64{
		"istio_tcp_connections_opened_total": 12,
		"istio_tcp_connections_closed_total": 12,
		"istio_tcp_received_bytes_total":     float64(sent),
		"istio_tcp_sent_bytes_total":         float64(got),
		"detour_authz_decisions_total":       12,
	} {
		if v := sum(t, reg, name); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
	labels := metrics.Sum(m.Opened, istioStreamLabels("sleep", "echo"))
	if labels != 12 {
		t.Errorf("opened with Istio's labels = %v, want 12", labels)
	}
}

func sum(t *testing.T, reg *prometheus.Registry, name string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			total += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return total
}
