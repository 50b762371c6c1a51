package interop

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	it "github.com/detour-mesh/detour/integration"
)

// The detour binary, built once for the tests that run the `detour waypoint` process, removed by
// TestMain.
var detour struct {
	once   sync.Once
	bin    string
	remove func()
	err    error
}

func detourBinary(t *testing.T) string {
	detour.once.Do(func() { detour.bin, detour.remove, detour.err = it.BuildDetour("interop") })
	if detour.err != nil {
		t.Fatal(detour.err)
	}
	return detour.bin
}

const procWaypointID = "spiffe://cluster.local/ns/demo/sa/detour"

// procBed is the jwtBed's mesh served by the real `detour waypoint` process: service web
// (10.96.0.40: 80 declared http, 81 undeclared, 82 declared tcp) with one pod (127.0.0.2) behind
// Istio's Go HBONE server, whose HTTP app answers with the headers it received as JSON and whose
// TCP app greets with "web-tcp". The waypoint's policies and RequestAuthentications come from its
// static discovery document, so each scenario writes a new document and starts a new process
// (the document is read once, at start). Sources are Istio's Go HBONE client with an identity
// per case from the waypoint's own dev CA.
type procBed struct {
	dir, caDir string
	ca         *devca.CA
	port       int // HBONE: the waypoint on 127.0.0.1, the pod on 127.0.0.2
	httpPort   int
	tcpPort    int
	jwksURL    string
	proc       *it.Proc
	hbone      string
}

func newProcBed(t *testing.T, samplesJWKS string) *procBed {
	it.QuietIstio()
	b := &procBed{dir: t.TempDir()}
	b.caDir = filepath.Join(b.dir, "ca")
	var err error
	if b.ca, err = devca.Init(b.caDir, "cluster.local"); err != nil {
		t.Fatal(err)
	}
	b.port = it.FreePort(t, "127.0.0.2")
	hl, err := net.Listen("tcp", net.JoinHostPort("127.0.0.2", strconv.Itoa(b.port)))
	if err != nil {
		t.Skipf("port %d not free on 127.0.0.2: %v", b.port, err)
	}
	if l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(b.port))); err != nil {
		t.Skipf("port %d not free on 127.0.0.1: %v", b.port, err)
	} else {
		l.Close()
	}
	it.IstioServerOn(t, hl, identity.ServerTLS(b.source(t, "spiffe://cluster.local/ns/demo/sa/web"), nil))

	b.httpPort = headersApp(t).Addr().(*net.TCPAddr).Port
	tcp := it.ListenAt(t, "127.0.0.2:0")
	b.tcpPort = tcp.Addr().(*net.TCPAddr).Port
	it.BackendOn(t, tcp, func(c *net.TCPConn) { io.WriteString(c, "web-tcp\n"); io.Copy(io.Discard, c) })

	b.jwksURL = jwksServer(t, samplesJWKS)
	return b
}

func (b *procBed) source(t *testing.T, id string) identity.Source {
	svid, err := b.ca.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return identity.Static(&identity.Identity{SVID: svid, Bundle: b.ca.Bundle()})
}

// apply writes the objects (istiod's validation runs on each) into a new static document and
// starts a new waypoint process on it, stopping the previous one.
func (b *procBed) apply(t *testing.T, docs string) {
	t.Helper()
	var policies, ras []map[string]any
	for _, o := range decodeObjects(t, docs, b.jwksURL) {
		entry := map[string]any{"name": o.Name, "namespace": o.Namespace, "spec": o.Spec}
		if len(o.Annotations) > 0 {
			entry["annotations"] = o.Annotations
		}
		if o.Kind == "RequestAuthentication" {
			ras = append(ras, entry)
		} else {
			policies = append(policies, entry)
		}
	}
	ep := []map[string]any{{"ip": "127.0.0.2", "serviceAccount": "web"}}
	doc := map[string]any{
		"identity":  map[string]any{"source": "devca", "devca": map[string]any{"dir": b.caDir, "id": procWaypointID}},
		"listeners": map[string]any{"hbone": fmt.Sprintf("127.0.0.1:%d", b.port), "health": "127.0.0.1:0", "tunnel": "127.0.0.1:0", "upstreamHBONEPort": b.port},
		"waypoint":  map[string]any{"namespace": "demo", "gateway": "detour"},
		"discovery": map[string]any{"static": map[string]any{
			"services": []map[string]any{{"name": "web", "namespace": "demo", "vips": []string{"10.96.0.40"}, "endpoints": ep,
				"ports": []map[string]any{
					{"name": "http", "port": 80, "targetPort": b.httpPort},
					{"name": "", "port": 81, "targetPort": b.httpPort},
					{"name": "tcp", "port": 82, "targetPort": b.tcpPort}}}},
			"policies":               policies,
			"requestAuthentications": ras,
		}},
	}
	j, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(b.dir, "waypoint.yaml")
	if err := os.WriteFile(path, j, 0o600); err != nil {
		t.Fatal(err)
	}
	if b.proc != nil { // killed: a graceful stop would wait for the clients' idle connections
		b.proc.Process.Kill()
		<-b.proc.Done
	}
	b.proc = it.Start(t, exec.Command(detourBinary(t), "waypoint", "--config", path))
	b.hbone = b.proc.Find(t, `msg="waypoint serving" hbone=(\S+)`)
}

// dialer is Istio's Go HBONE client with identity from (ztunnel's role for that source).
func (b *procBed) dialer(t *testing.T, from string) istiohbone.Dialer {
	svid, err := b.ca.Issue(from, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return istiohbone.NewDialer(istiohbone.Config{ProxyAddress: b.hbone,
		TLS: b.ca.ClientTLS(svid, spiffeid.RequireFromString(procWaypointID))})
}

func (b *procBed) client(t *testing.T, h2 bool, from string) *http.Client {
	d := b.dialer(t, from)
	var p http.Protocols
	if h2 {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: &p, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", addr)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// checkTCP opens an opaque stream to web's TCP port 82 as from: code 200 wants the app's
// greeting, 403 a refused CONNECT.
func (b *procBed) checkTCP(t *testing.T, from string, code int) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := b.dialer(t, from).DialContext(ctx, "tcp", "10.96.0.40:82")
	if err == nil {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 8)
		_, err = io.ReadFull(c, buf)
		if err == nil && string(buf) != "web-tcp\n" {
			err = fmt.Errorf("greeting %q", buf)
		}
	}
	switch {
	case code == 200 && err != nil:
		t.Fatalf("TCP as %s: %v, want the app's greeting", from, err)
	case code != 200 && err == nil:
		t.Fatalf("TCP as %s reached the app, want a refused CONNECT", from)
	}
}

// The AuthorizationPolicy and RequestAuthentication conformance table run end to end through
// the `detour waypoint` process: Istio's JWT scenarios (jwt_cases_test.go) and its authorization
// scenarios (authz_cases_test.go), over HTTP/1.1 and HTTP/2, from Istio's Go HBONE client.
func TestPolicyThroughDetourProcess(t *testing.T) {
	samplesJWKS, demo, groupsScope := samples(t)
	b := newProcBed(t, samplesJWKS)
	scenarios := append(authzScenarios(), jwtScenarios(demo, groupsScope)...)
	n := 0
	for _, sc := range scenarios {
		b.apply(t, sc.objects)
		clients := map[string]*http.Client{}
		for _, tc := range sc.cases {
			n++
			from := tc.from
			if from == "" {
				from = it.ClientID
			}
			if tc.tcp {
				t.Run(sc.source+"/"+tc.name+"/tcp", func(t *testing.T) { b.checkTCP(t, from, tc.code) })
				continue
			}
			for _, h2 := range []bool{false, true} {
				key := fmt.Sprint(from, h2)
				if clients[key] == nil {
					clients[key] = b.client(t, h2, from)
				}
				t.Run(fmt.Sprintf("%s/%s/h2=%v", sc.source, tc.name, h2), func(t *testing.T) {
					checkJWTCase(t, clients[key], tc)
				})
			}
		}
	}
	t.Logf("%d cases in %d scenarios through the detour waypoint process", n, len(scenarios))
	if n < 150 {
		t.Errorf("%d cases, the table promises at least 150", n)
	}
}
