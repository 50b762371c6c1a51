package waypoint_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// greeterBed is the HTTP bed with service mail (10.96.0.25:25, the port named portName) whose
// one pod runs a server-first app: it greets, then answers one line.
func greeterBed(t *testing.T, portName string, tweak func(*waypoint.Handler)) *httpBed {
	greeter, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { greeter.Close() })
	go func() {
		for {
			c, err := greeter.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				io.WriteString(c, "220 greeter ready\r\n")
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				io.WriteString(c, "250 got "+line)
			}()
		}
	}()
	gport := uint16(greeter.Addr().(*net.TCPAddr).Port)
	return newHTTPBed(t, route.Port{Name: portName, Port: 25}, func(h *waypoint.Handler) {
		h.Inspect = waypoint.InspectAuto
		table, err := route.NewTable([]*route.Service{{Name: "mail", Namespace: "demo", Hostname: "mail.demo.svc.cluster.local",
			VIPs:      []netip.Addr{netip.MustParseAddr("10.96.0.25")},
			Ports:     []route.Port{{Name: portName, Port: 25, TargetPort: gport}},
			Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("127.0.0.2"), Ready: true, ServiceAccount: "web"}}}})
		if err != nil {
			t.Fatal(err)
		}
		h.Routes = func() *route.Table { return table }
		if tweak != nil {
			tweak(h)
		}
	})
}

// A server-speaks-first protocol (the client says nothing until the server greets) behaves as
// with Istio's waypoint: on an undeclared port the stream waits for the client's bytes as long
// as Envoy's listener filters would (SniffWait), then is reset and counted, the server never
// reached (Envoy connects upstream only once its filters decided); on a port declared tcp it
// is not sniffed and works. (The wait here is shortened: what it is worth is what is tested.)
func TestServerFirst(t *testing.T) {
	greet := func(b *httpBed) (string, error) {
		s, err := b.client.Dial(context.Background(), b.waypoint, "10.96.0.25:25", b.opts)
		if err != nil {
			return "", err
		}
		defer s.Close()
		s.SetReadDeadline(time.Now().Add(10 * time.Second)) // a hang guard
		r := bufio.NewReader(s)
		greeting, err := r.ReadString('\n')
		if err != nil {
			return greeting, err
		}
		io.WriteString(s, "HELO detour\r\n")
		reply, err := r.ReadString('\n')
		return greeting + reply, err
	}
	t.Run("undeclared", func(t *testing.T) {
		b := greeterBed(t, "smtp", func(h *waypoint.Handler) { h.SniffWait = 100 * time.Millisecond })
		got, err := greet(b)
		if err == nil || got != "" {
			t.Fatalf("got %q, %v; want the stream reset before any byte (Istio's waypoint closes it when its listener filters time out)", got, err)
		}
		if n := sum(t, b.reg, "detour_sniff_refused_total"); n != 1 {
			t.Errorf("detour_sniff_refused_total = %v, want 1", n)
		}
		if n := sum(t, b.reg, "detour_sniffing_streams"); n != 0 {
			t.Errorf("detour_sniffing_streams = %v, want 0 once refused", n)
		}
		if n := sum(t, b.reg, "istio_tcp_connections_opened_total"); n != 0 {
			t.Errorf("istio_tcp_connections_opened_total = %v, want 0 (never carried)", n)
		}
	})
	t.Run("declared tcp", func(t *testing.T) {
		b := greeterBed(t, "tcp-smtp", nil) // the default wait: never reached, nothing sniffed
		if got, err := greet(b); err != nil || got != "220 greeter ready\r\n250 got HELO detour\r\n" {
			t.Fatalf("got %q, %v", got, err)
		}
		if n := sum(t, b.reg, "istio_tcp_connections_opened_total"); n != 1 {
			t.Errorf("istio_tcp_connections_opened_total = %v, want 1", n)
		}
	})
}

const lateRoutes = `
kind: TLSRoute
metadata: {name: late, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 9000}]
  hostnames: [late.example.com]
  rules: [{backendRefs: [{name: echo-v2, port: 443}]}]
`

const restRoute = `
kind: TCPRoute
metadata: {name: rest, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 9000}]
  rules: [{backendRefs: [{name: echo-v1, port: 5432}]}]
`

// Regression (issue 17): on an undeclared port with a TLSRoute and a TCPRoute, a client whose
// ClientHello comes 300 ms after the 200 (later than detour's old 200 ms sniff wait, well
// within Envoy's listener filter timeout) takes the TLSRoute by its SNI, under the default wait.
// It went to the TCPRoute (echo-v1's plain port: the handshake failed).
func TestLateClientHelloTakesTLSRoute(t *testing.T) {
	b := newL4Bed(t, func(h *waypoint.Handler) { h.SniffWait = 0 }, lateRoutes, restRoute)
	b.late = 300 * time.Millisecond // the late client: a delay, never a pass criterion
	if pod, err := b.exchange(t, "10.96.0.30:9000", "late.example.com", payload(t, 1000)); err != nil || pod != "echo-v2" {
		t.Fatalf("late ClientHello: %q, %v; want echo-v2 (the TLSRoute)", pod, err)
	}
	b.late = 0
	if pod, err := b.exchange(t, "10.96.0.30:9000", "", payload(t, 1000)); err != nil || pod != "echo-v1" {
		t.Fatalf("plain bytes: %q, %v; want echo-v1 (the TCPRoute)", pod, err)
	}
}

// On a port declared tcp that detour sniffs for a TLSRoute's SNI (Istio's waypoint would not
// look), a server-first client is carried as declared once OpaqueSniffWait runs out: it reads
// the TCPRoute backend's banner without having said anything.
func TestServerFirstOnDeclaredSNIPort(t *testing.T) {
	tlsOn5432 := `
kind: TLSRoute
metadata: {name: sni, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 5432}]
  hostnames: [api.example.com]
  rules: [{backendRefs: [{name: echo-v2, port: 443}]}]
`
	tcpOn5432 := `
kind: TCPRoute
metadata: {name: rest, namespace: demo}
spec:
  parentRefs: [{name: echo, port: 5432}]
  rules: [{backendRefs: [{name: echo-v1, port: 5432}]}]
`
	b := newL4Bed(t, func(h *waypoint.Handler) { h.OpaqueSniffWait = 50 * time.Millisecond }, tlsOn5432, tcpOn5432)
	s, err := b.client.Dial(context.Background(), b.waypoint, "10.96.0.30:5432", b.opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetReadDeadline(time.Now().Add(10 * time.Second)) // a hang guard
	if banner, err := bufio.NewReader(s).ReadString('\n'); err != nil || banner != "echo-v1\n" {
		t.Fatalf("banner %q, %v; want echo-v1's (the TCPRoute), unprompted", banner, err)
	}
}

// Streams waiting for their first bytes are bounded per client (its identity): one more than
// MaxSniffing is refused with a 503 before anything is dialed, and counted; another client is
// not affected; once a waiting stream ends its share is free again.
func TestSniffingPerClient(t *testing.T) {
	b := greeterBed(t, "smtp", func(h *waypoint.Handler) {
		h.MaxSniffing = 2
		h.SniffWait = 30 * time.Second // the streams are ended by the test, not by the wait
	})
	dialWith := func(d *hbone.Dialer, opts hbone.DialOptions) (*hbone.Stream, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return d.Dial(ctx, b.waypoint, "10.96.0.25:25", opts)
	}
	dial := func(opts hbone.DialOptions) (*hbone.Stream, error) { return dialWith(b.client, opts) }
	var held []*hbone.Stream
	defer func() {
		for _, s := range held {
			s.Close()
		}
	}()
	for i := range 2 {
		s, err := dial(b.opts)
		if err != nil {
			t.Fatalf("silent stream %d: %v", i, err)
		}
		held = append(held, s)
	}
	var se *hbone.StatusError
	if s, err := dial(b.opts); !errors.As(err, &se) || se.Code != 503 {
		if s != nil {
			s.Close()
		}
		t.Fatalf("a third silent stream of the same client: %v, want a 503", err)
	}
	if n := sum(t, b.reg, "detour_sniff_refused_total"); n != 1 {
		t.Errorf("detour_sniff_refused_total = %v, want 1 (the limit)", n)
	}
	if n := sum(t, b.reg, "detour_sniffing_streams"); n != 2 {
		t.Errorf("detour_sniffing_streams = %v, want 2", n)
	}
	// Another client has its own share.
	other, _ := identity.ClientTLS(b.id("spiffe://cluster.local/ns/default/sa/other"), spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/waypoint"))
	otherOpts := b.opts
	otherOpts.TLSConfig = other
	otherClient := &hbone.Dialer{Logger: quiet} // its own connection, with its own certificate
	t.Cleanup(func() { otherClient.Close() })
	s, err := dialWith(otherClient, otherOpts)
	if err != nil {
		t.Fatalf("another client: %v", err)
	}
	held = append(held, s)
	// The first client's share comes back when one of its streams ends.
	held[0].Close()
	deadline := time.Now().Add(10 * time.Second) // a hang guard
	for sum(t, b.reg, "detour_sniffing_streams") != 2 {
		if time.Now().After(deadline) {
			t.Fatal("the ended stream's share never came back")
		}
		time.Sleep(10 * time.Millisecond)
	}
	s, err = dial(b.opts)
	if err != nil {
		t.Fatalf("after one stream ended: %v", err)
	}
	held = append(held, s)
}
