package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// jwtStatic is a RequestAuthentication (RS256 key inline, as Istio's samples) and an ALLOW
// requiring a request principal, both on Service echo.
func jwtStatic(b *testing.B) (static, token string) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "bench", Algorithm: "RS256", Use: "sig"}}})
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", "bench"))
	if err != nil {
		b.Fatal(err)
	}
	token, err = jwt.Signed(sig).Claims(map[string]any{"iss": "bench@detour", "sub": "client", "exp": time.Now().Add(time.Hour).Unix(),
		"groups": []string{"a", "b"}}).Serialize()
	if err != nil {
		b.Fatal(err)
	}
	static = `    requestAuthentications:
    - name: jwt
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
        jwtRules: [{issuer: bench@detour, jwks: '` + string(jwks) + `'}]
    policies:
    - name: require-jwt
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
        rules: [{from: [{source: {requestPrincipals: ["bench@detour/client"]}}]}]
`
	return static, token
}

// BenchmarkPinnedHTTPJWT: HTTP/1.1 requests (1 KiB echoed, 8 connections) through the waypoint
// process with HTTP parsed by default, every request carrying a bearer token; "http" has no
// RequestAuthentication, "jwt" validates the token (RS256) and authorizes its request principal;
// on an undeclared port (sniffed) and, "declared-", on a port named http; "declared-100routes"
// has no JWT but an HTTPRoute of 100 rules (hundredRules) on the port; "jwt-100routes" (sniffed)
// has both, issue 21's goal 5 (BenchmarkPinnedGRPC is its gRPC twin). Reports the waypoint's
// vCPU per 1000 req/s.
func BenchmarkPinnedHTTPJWT(b *testing.B) {
	static, token := jwtStatic(b)
	const conns = 8
	for _, name := range []string{"http", "jwt", "declared-http", "declared-jwt", "declared-100routes", "jwt-100routes"} {
		b.Run(name, func(b *testing.B) {
			app := backendHTTP(b)
			doc := ""
			switch {
			case name == "jwt-100routes": // issue 21 goal 5: sniffed, a JWT rule and 100 routes
				doc = static + hundredRulesStatic()
			case strings.HasSuffix(name, "jwt"):
				doc = static
			case strings.HasSuffix(name, "100routes"):
				doc = hundredRulesStatic() // every request matched against all 100 rules
			}
			portName := "echo"
			if strings.HasPrefix(name, "declared-") {
				portName = "http"
			}
			w := newPinnedBedWith(b, app, "auto", portName, doc)
			d := dialer(b)
			tr := &http.Transport{MaxConnsPerHost: conns, MaxIdleConnsPerHost: conns, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return w.dial(b, d, "waypoint", app)
			}}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr}
			msg := bytes.Repeat([]byte("x"), 1024)
			do := func() {
				req, _ := http.NewRequest("POST", "http://10.96.0.10:80/echo", bytes.NewReader(msg))
				req.Header.Set("Authorization", "Bearer "+token)
				resp, err := c.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || n != int64(len(msg)) {
					b.Fatalf("%d, %d bytes", resp.StatusCode, n)
				}
			}
			runParallel(b, conns, func(int) { do() }, w.cpu)
		})
	}
}
