package testbed_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/detour-mesh/detour/identity/istioca"
	"github.com/detour-mesh/detour/integration/testbed"
)

// istiod's CA issues exactly the identity of the token's service account, and refuses a token
// with the wrong audience with a clear error.
func TestIstioCA(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.Namespace(ctx, "demo", nil); err != nil {
		t.Fatal(err)
	}
	sign := func(sa, audience string) (*x509svid.SVID, error) {
		token, err := c.ServiceAccountToken(ctx, "demo", sa, audience)
		if err != nil {
			t.Fatal(err)
		}
		key, err := istioca.NewKey()
		if err != nil {
			t.Fatal(err)
		}
		cl := &istioca.Client{Addr: c.Istiod.CAAddr, ServerName: c.Istiod.ServerName, RootCAs: c.Istiod.Roots,
			Token: func(context.Context) (string, error) { return token, nil }}
		return cl.Sign(ctx, key, time.Hour)
	}
	for _, sa := range []string{"detour", "other"} {
		svid, err := sign(sa, "istio-ca")
		if err != nil {
			t.Fatalf("%s: %v", sa, err)
		}
		if want := "spiffe://cluster.local/ns/demo/sa/" + sa; svid.ID.String() != want {
			t.Fatalf("got %s, want %s", svid.ID, want)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, rootBundle(c)); err != nil {
			t.Fatalf("%s: the issued chain does not verify against the mesh root: %v", sa, err)
		}
		if ttl := time.Until(svid.Certificates[0].NotAfter); ttl > time.Hour+time.Minute || ttl < 50*time.Minute {
			t.Errorf("%s: lifetime %v, asked for 1h", sa, ttl)
		}
	}
	_, err := sign("detour", "wrong-audience")
	if err == nil || !strings.Contains(err.Error(), "istioca: CreateCertificate at "+c.Istiod.CAAddr+" refused: Unauthenticated") {
		t.Fatalf("wrong audience: got %v", err)
	}
	t.Logf("wrong audience: %v", err)
}
