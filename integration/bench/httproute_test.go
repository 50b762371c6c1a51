package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/route"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// hundredRules is an HTTPRoute on echo with 100 rules: 99 that the benchmark's request does not
// match (each an Exact path with a header and a method, which outrank the last) and a last
// PathPrefix / that it does, so every request is matched against all of them.
func hundredRules() *httproute.HTTPRoute {
	r, err := httproute.DecodeHTTPRoute([]byte(hundredRulesYAML()))
	if err != nil {
		panic(err)
	}
	return r
}

// hundredRulesYAML is hundredRules as YAML.
func hundredRulesYAML() string {
	var b strings.Builder
	b.WriteString("metadata: {name: many, namespace: demo}\nspec:\n  parentRefs: [{kind: Service, name: echo, port: 80}]\n  rules:\n")
	for i := range 99 {
		fmt.Fprintf(&b, "  - matches: [{path: {type: Exact, value: /r%d}, method: GET, headers: [{name: x-tenant, value: t%d}]}]\n    backendRefs: [{name: echo, port: 80}]\n", i, i)
	}
	b.WriteString("  - matches: [{path: {type: PathPrefix, value: /}}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed, value: \"1\"}]}}]\n    backendRefs: [{name: echo, port: 80}]\n")
	return b.String()
}

// hundredRulesStatic is hundredRules as discovery.static.httpRoutes (indented for that mapping).
func hundredRulesStatic() string {
	lines := strings.Split(strings.TrimSuffix(hundredRulesYAML(), "\n"), "\n")
	for i, l := range lines {
		lines[i] = "      " + l
	}
	lines[0] = "    - " + strings.TrimPrefix(lines[0], "      ")
	return "    httpRoutes:\n" + strings.Join(lines, "\n") + "\n"
}

// BenchmarkHTTPRoutes: sequential HTTP/1.1 keep-alive requests (1 KiB echoed) through the
// waypoint to service echo with no route ("none") and with an HTTPRoute of 100 rules, the
// request matching the last ("100-rules"). p50/p99 per request, side by side in one run.
func BenchmarkHTTPRoutes(b *testing.B) {
	for _, name := range []string{"none", "100-rules"} {
		b.Run(name, func(b *testing.B) {
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
				Ports:     []route.Port{{Name: "http", Port: 80, TargetPort: uint16(httpEcho(b, "127.0.0.2"))}},
				Endpoints: []route.Endpoint{{IP: netip.MustParseAddr("127.0.0.2"), Ready: true, ServiceAccount: "echo"}}}})
			if err != nil {
				b.Fatal(err)
			}
			var hrs []*httproute.HTTPRoute
			if name == "100-rules" {
				hrs = append(hrs, hundredRules())
			}
			routes, err := httproute.Compile(table, "demo", hrs, nil)
			if err != nil {
				b.Fatal(err)
			}
			onward := &hbone.Dialer{Logger: quiet}
			b.Cleanup(func() { onward.Close() })
			wp := detourServer(b, p, &waypoint.Handler{Routes: func() *route.Table { return table }, Identity: issue(it.ServerID), Dialer: onward,
				HBONEPort: uint16(bl.Addr().(*net.TCPAddr).Port), Logger: quiet, HTTPRoutes: func() *httproute.Table { return routes }})
			cliTLS, _ := identity.ClientTLS(issue(it.ClientID), spiffeid.RequireFromString(it.ServerID))
			opts := hbone.DialOptions{TLSConfig: cliTLS}
			d := dialer(b)
			tr := &http.Transport{MaxConnsPerHost: 1, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return d.Dial(ctx, wp, addr, opts)
			}}
			defer tr.CloseIdleConnections()
			msg := bytes.Repeat([]byte("x"), 1024)
			latencies(b, func() time.Duration {
				req, _ := http.NewRequest("POST", "http://10.96.0.10:80/echo/item", bytes.NewReader(msg))
				req.Header.Set("X-Tenant", "t42")
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
