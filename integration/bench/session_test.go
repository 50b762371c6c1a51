package bench

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// sessionBed: detour's waypoint (every stream inspected) in front of one backend terminator on
// 127.0.0.2 for service echo (10.96.0.10:80), its developer tunnel listener (QUIC), and a client.
type sessionBed struct {
	b      *testing.B
	p      *it.PKI
	wp     string
	quic   string
	client hbone.DialOptions
	reg    *session.Registry
}

func newSessionBed(b *testing.B, targetPort int) *sessionBed {
	p := it.NewPKI(b)
	issue := func(id string) identity.Source { return p.Source(b, id) }
	bl, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		b.Fatal(err)
	}
	term := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(issue("spiffe://cluster.local/ns/demo/sa/echo"), nil), Logger: quiet}
	go term.Serve(bl)
	b.Cleanup(func() { term.Close() })
	table, err := route.NewTable([]*route.Service{{Name: "echo", Namespace: "demo", Hostname: "echo.demo.svc.cluster.local",
		VIPs:      []netip.Addr{netip.MustParseAddr("10.96.0.10")},
		Ports:     []route.Port{{Name: "echo", Port: 80, TargetPort: uint16(targetPort)}},
		Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("127.0.0.2"), Ready: true, ServiceAccount: "echo"}}}})
	if err != nil {
		b.Fatal(err)
	}
	engine := authz.New(authz.Waypoint{Namespace: "demo", Gateway: "detour"}, []*authz.Policy{{Namespace: "demo", Name: "devs",
		Spec: &secv1beta1.AuthorizationPolicy{
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "detour"}},
			Rules:      []*secv1beta1.Rule{{To: []*secv1beta1.Rule_To{{Operation: &secv1beta1.Operation{Methods: []string{"STEAL", "MIRROR"}}}}}},
		}}})
	wpID := issue(it.ServerID)
	s := &sessionBed{b: b, p: p, reg: &session.Registry{}}
	onward := &hbone.Dialer{Logger: quiet}
	b.Cleanup(func() { onward.Close() })
	routes := func() *route.Table { return table }
	s.wp = detourServer(b, p, &waypoint.Handler{Routes: routes, Identity: wpID, Dialer: onward,
		HBONEPort: uint16(bl.Addr().(*net.TCPAddr).Port), Logger: quiet, Inspect: waypoint.InspectAlways, Sessions: s.reg,
		Policies: func() *authz.Engine { return engine }})
	m := &session.Manager{Registry: s.reg, Routes: routes, Policies: func() *authz.Engine { return engine }, Namespace: "demo", Gateway: "detour", Logger: quiet}
	ts := &tunnel.Server{Identity: wpID, Handler: m.ServeTunnel, Logger: quiet}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ts.ServeQUIC(ctx, pc); close(done) }()
	b.Cleanup(func() { cancel(); <-done; pc.Close() })
	s.quic = pc.LocalAddr().String()
	cliTLS, _ := identity.ClientTLS(issue(it.ClientID), spiffeid.RequireFromString(it.ServerID))
	s.client = hbone.DialOptions{TLSConfig: cliTLS}
	return s
}

// open registers spec for a developer whose app is at to, and forwards its streams there.
func (s *sessionBed) open(spec tunnel.Spec, to string) {
	svid, err := s.p.CA.Issue("spiffe://cluster.local/ns/dev/sa/alice", time.Time{}, time.Time{})
	if err != nil {
		s.b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tn, err := tunnel.Dial(ctx, "quic", s.quic, identity.Static(&identity.Identity{SVID: svid, Bundle: s.p.CA.Bundle()}), nil, quiet)
	if err != nil {
		s.b.Fatal(err)
	}
	tunnel.WriteMsg(tn.Control(), tunnel.Hello{Register: &spec})
	var r tunnel.Reply
	if err := tunnel.ReadMsg(tn.Control(), &r); err != nil || !r.OK {
		s.b.Fatalf("registering: %v %s", err, r.Error)
	}
	go io.Copy(io.Discard, tn.Control())
	done := make(chan struct{})
	go func() { tn.Forward(ctx, to, nil); close(done) }()
	s.b.Cleanup(func() { cancel(); tn.Close(); <-done })
}

// httpEcho serves HTTP/1.1 echoing bodies on ip and returns its port.
func httpEcho(b *testing.B, ip string) int {
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Write(body)
	})}
	go srv.Serve(l)
	b.Cleanup(func() { srv.Close() })
	return l.Addr().(*net.TCPAddr).Port
}

// BenchmarkSessionSteal: sequential HTTP/1.1 keep-alive requests (1 KiB echoed) through the
// waypoint to the service ("passthrough", a steal session registered but the request lacks its
// header) against requests carrying the header, stolen to the developer's app through the QUIC
// tunnel ("steal"). p50/p99 per request.
func BenchmarkSessionSteal(b *testing.B) {
	for _, name := range []string{"passthrough", "steal"} {
		b.Run(name, func(b *testing.B) {
			s := newSessionBed(b, httpEcho(b, "127.0.0.2"))
			dev := httpEcho(b, "127.0.0.1")
			s.open(tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Steal,
				Filter: tunnel.Filter{Header: "x-dev", HeaderValue: "alice"}}, "127.0.0.1:"+strconv.Itoa(dev))
			d := dialer(b)
			tr := &http.Transport{MaxConnsPerHost: 1, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return d.Dial(ctx, s.wp, addr, s.client)
			}}
			defer tr.CloseIdleConnections()
			msg := bytes.Repeat([]byte("x"), 1024)
			latencies(b, func() time.Duration {
				req, _ := http.NewRequest("POST", "http://10.96.0.10:80/echo", bytes.NewReader(msg))
				if name == "steal" {
					req.Header.Set("X-Dev", "alice")
				}
				start := time.Now()
				resp, err := tr.RoundTrip(req)
				if err != nil {
					b.Fatal(err)
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || n != int64(len(msg)) {
					b.Fatalf("%d, %d bytes", resp.StatusCode, n)
				}
				return time.Since(start)
			})
		})
	}
}

// BenchmarkSessionMirror: one bulk stream through the waypoint, with no session ("none") and
// with a whole-stream mirror whose developer app never reads ("stalled-mirror").
func BenchmarkSessionMirror(b *testing.B) {
	for _, name := range []string{"none", "stalled-mirror"} {
		b.Run(name, func(b *testing.B) {
			got := make(chan int64, 1)
			sink := backendOn(b, func(c *net.TCPConn) { n, _ := io.Copy(io.Discard, c); got <- n })
			s := newSessionBed(b, sink)
			if name == "stalled-mirror" {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { l.Close() })
				go func() {
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						b.Cleanup(func() { c.Close() }) // never read
					}
				}()
				s.open(tunnel.Spec{Namespace: "demo", Service: "echo", Port: 80, Mode: session.Mirror}, l.Addr().String())
			}
			st, err := dialer(b).Dial(context.Background(), s.wp, "10.96.0.10:80", s.client)
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			bulk(b, st, st.CloseWrite, got)
		})
	}
}
