package mesh

import (
	"context"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	it "github.com/detour-mesh/detour/integration"
	"github.com/detour-mesh/detour/integration/testbed"
)

// The developer's CLI gets its identity from istiod's CA for a service account its kubeconfig may
// request tokens for (TokenRequest), and the waypoint (identity from istiod's CA too) checks
// that principal against AuthorizationPolicy.
func TestMeshIdentityForTheCLI(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, ns := range []string{"shop", "dev"} {
		if err := c.Namespace(ctx, ns, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.ServiceAccountToken(ctx, "dev", "alice", "istio-ca"); err != nil { // creates the account
		t.Fatal(err)
	}
	token, err := c.ServiceAccountToken(ctx, "shop", "detour", "istio-ca")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tokenFile, rootFile := filepath.Join(dir, "token"), filepath.Join(dir, "root.pem")
	os.WriteFile(tokenFile, []byte(token), 0o600)
	os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Istiod.Root.Raw}), 0o644)
	cfg := filepath.Join(dir, "waypoint.yaml")
	doc := fmt.Sprintf(`identity: {source: istio-ca, istioCA: {addr: %q, tokenFile: %q, rootCertFile: %q}}
listeners: {hbone: "127.0.0.1:0", health: "off", tunnel: "127.0.0.1:0"}
waypoint: {namespace: shop, gateway: detour}
discovery:
  static:
    services: [{name: web, namespace: shop, vips: [10.96.0.50], ports: [{name: http, port: 80}]}]
    policies:
    - name: alice-steals
      namespace: shop
      spec:
        targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: detour}]
        action: ALLOW
        rules:
        - from: [{source: {principals: [cluster.local/ns/dev/sa/alice]}}]
          to: [{operation: {methods: [STEAL]}}]
`, c.Istiod.CAAddr, tokenFile, rootFile)
	os.WriteFile(cfg, []byte(doc), 0o600)
	wp := start(t, "waypoint", "--config", cfg)
	tunnel := wp.Find(t, `tunnel=(127\.0\.0\.1:\d+)`)
	steal := func(sa string) *it.Proc {
		return start(t, "steal", "svc/web:80", "-n", "shop", "--to", "127.0.0.1:1", "--waypoint", tunnel,
			"--service-account", sa, "--kubeconfig", c.Kubeconfig, "--istiod", c.Istiod.CAAddr, "--mesh-root", rootFile)
	}
	alice := steal("dev/alice")
	alice.WaitFor(t, "stealing shop/web")
	wp.WaitFor(t, "developer=spiffe://cluster.local/ns/dev/sa/alice")
	if _, err := c.ServiceAccountToken(ctx, "dev", "bob", "istio-ca"); err != nil {
		t.Fatal(err)
	}
	bob := steal("dev/bob")
	bob.WaitFor(t, "STEAL on web.shop.svc.cluster.local port 80 refused for cluster.local/ns/dev/sa/bob")
}
