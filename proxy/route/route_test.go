package route

import (
	"errors"
	"net/netip"
	"testing"
	"time"
)

func svc() *Service {
	return &Service{Name: "echo", Namespace: "demo", Hostname: "echo.demo.svc.cluster.local",
		VIPs:  []netip.Addr{netip.MustParseAddr("10.96.0.10")},
		Ports: []Port{{Name: "http", Port: 80, TargetPort: 8080}},
		Endpoints: []Endpoint{
			{IP: netip.MustParseAddr("10.244.0.1"), Ready: true},
			{IP: netip.MustParseAddr("10.244.0.2"), Ready: true},
			{IP: netip.MustParseAddr("10.244.0.3"), Ready: false},
		}}
}

func TestResolve(t *testing.T) {
	tb, err := NewTable([]*Service{svc()})
	if err != nil {
		t.Fatal(err)
	}
	b := &Balancer{}
	d1, err := tb.Resolve(netip.MustParseAddrPort("10.96.0.10:80"), b)
	if err != nil {
		t.Fatal(err)
	}
	d2, _ := tb.Resolve(netip.MustParseAddrPort("10.96.0.10:80"), b)
	if len(d1.Candidates) != 2 || d1.Candidates[0] == d2.Candidates[0] || d1.Candidates[0].Port() != 8080 {
		t.Fatalf("round robin: %v then %v", d1.Candidates, d2.Candidates)
	}
	// Ejected endpoints go last.
	now := time.Now()
	b.Now = func() time.Time { return now }
	b.Failed(netip.MustParseAddrPort("10.244.0.1:8080"))
	for range 3 {
		d, _ := tb.Resolve(netip.MustParseAddrPort("10.96.0.10:80"), b)
		if d.Candidates[0] != netip.MustParseAddrPort("10.244.0.2:8080") {
			t.Fatalf("ejected endpoint first: %v", d.Candidates)
		}
	}
	now = now.Add(DefaultEjection + time.Second)
	seen := map[netip.AddrPort]bool{}
	for range 2 {
		d, _ := tb.Resolve(netip.MustParseAddrPort("10.96.0.10:80"), b)
		seen[d.Candidates[0]] = true
	}
	if len(seen) != 2 {
		t.Fatal("endpoint not back after the ejection")
	}
	// Workload-addressed.
	d, err := tb.Resolve(netip.MustParseAddrPort("10.244.0.2:8080"), b)
	if err != nil || d.Service.Name != "echo" || d.Candidates[0] != netip.MustParseAddrPort("10.244.0.2:8080") || d.Port.Name != "http" {
		t.Fatalf("workload: %+v %v", d, err)
	}
}

func TestResolveErrors(t *testing.T) {
	empty := svc()
	empty.Name, empty.VIPs, empty.Endpoints = "empty", []netip.Addr{netip.MustParseAddr("10.96.0.11")}, nil
	tb, _ := NewTable([]*Service{svc(), empty})
	for _, tc := range []struct {
		target string
		is     error
		msg    string
	}{
		{"10.96.0.10:81", ErrUnknownTarget, "route: no service or workload at this address: demo/echo has no port 81"},
		{"10.96.9.9:80", ErrUnknownTarget, "route: no service or workload at this address: 10.96.9.9:80"},
		{"10.96.0.11:80", ErrNoEndpoints, "route: no ready endpoint for demo/empty"},
	} {
		_, err := tb.Resolve(netip.MustParseAddrPort(tc.target), nil)
		if !errors.Is(err, tc.is) || err.Error() != tc.msg {
			t.Errorf("%s: got %v, want %q", tc.target, err, tc.msg)
		}
	}
	dup := svc()
	dup.Name = "dup"
	if _, err := NewTable([]*Service{svc(), dup}); err == nil || err.Error() != "route: VIP 10.96.0.10 belongs to both demo/echo and demo/dup" {
		t.Fatalf("got %v", err)
	}
}

// Least request: of the two endpoints drawn, the one with fewer in flight wins; Done returns it.
func TestLeastRequest(t *testing.T) {
	s := svc()
	s.Endpoints[2].Ready = true
	tb, err := NewTable([]*Service{s})
	if err != nil {
		t.Fatal(err)
	}
	draws := []int{0, 0} // always draw endpoints 0 and 1
	b := &Balancer{Policy: LeastRequest, Rand: func(int) int { v := draws[0]; draws = append(draws[1:], v); return v }}
	first := func() netip.AddrPort {
		d, err := tb.Resolve(netip.MustParseAddrPort("10.96.0.10:80"), b)
		if err != nil {
			t.Fatal(err)
		}
		return d.Candidates[0]
	}
	ep1, ep2 := netip.MustParseAddrPort("10.244.0.1:8080"), netip.MustParseAddrPort("10.244.0.2:8080")
	if got := first(); got != ep1 {
		t.Fatalf("tie: got %v, want the first drawn %v", got, ep1)
	}
	b.Started(ep1)
	if got := first(); got != ep2 {
		t.Fatalf("with %v busy: got %v", ep1, got)
	}
	b.Done(ep1)
	b.Started(ep2)
	if got := first(); got != ep1 {
		t.Fatalf("with %v busy: got %v", ep2, got)
	}
	b.Done(ep2)
	if len(b.active) != 0 {
		t.Fatalf("in-flight counts left: %v", b.active)
	}
}

// A service not bound to this waypoint is refused by VIP and by pod; a pod shared with a bound
// service is that service's workload. The Self service's VIPs and endpoints are the waypoint's.
func TestBindingAndSelf(t *testing.T) {
	unbound := svc()
	unbound.Unbound = true
	own := &Service{Name: "detour", Namespace: "demo", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.99")}, Self: true,
		Ports: []Port{{Port: 15008, TargetPort: 15008}}, Endpoints: []Endpoint{{IP: netip.MustParseAddr("10.244.0.50"), Ready: true}}}
	shared := &Service{Name: "other", Namespace: "demo", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.11")},
		Ports: []Port{{Port: 80, TargetPort: 8080}}, Endpoints: []Endpoint{{IP: netip.MustParseAddr("10.244.0.2"), Ready: true}}}
	tb, err := NewTable([]*Service{shared, unbound, own})
	if err != nil {
		t.Fatal(err)
	}
	for target, want := range map[string]string{
		"10.96.0.10:80":   "route: not bound to this waypoint: demo/echo (its istio.io/use-waypoint names another waypoint or none)",
		"10.244.0.1:8080": "route: not bound to this waypoint: workload 10.244.0.1 of demo/echo (its istio.io/use-waypoint names another waypoint or none)",
	} {
		if _, err := tb.Resolve(netip.MustParseAddrPort(target), nil); err == nil || err.Error() != want || !errors.Is(err, ErrNotBound) {
			t.Errorf("%s: %v, want %q", target, err, want)
		}
	}
	if d, err := tb.Resolve(netip.MustParseAddrPort("10.244.0.2:8080"), nil); err != nil || d.Service.Name != "other" {
		t.Errorf("a pod of a bound and an unbound service: %+v %v", d, err)
	}
	for addr, want := range map[string]bool{"10.96.0.99": true, "10.244.0.50": true, "::ffff:10.244.0.50": true, "10.96.0.10": false, "10.244.0.2": false} {
		if got := tb.IsSelf(netip.MustParseAddr(addr)); got != want {
			t.Errorf("IsSelf(%s) = %v, want %v", addr, got, want)
		}
	}
}
