package istioca

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/detour-mesh/detour/identity/devca"
)

func chainPEM(t testing.TB) (string, string) {
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	svid, err := ca.Issue("spiffe://cluster.local/ns/a/sa/b", time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	enc := func(c *x509.Certificate) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	return enc(svid.Certificates[0]), enc(ca.Root())
}

func TestParseChain(t *testing.T) {
	leaf, root := chainPEM(t)
	for _, tc := range []struct {
		name string
		in   []string
		n    int
		err  string
	}{
		{"leaf and root", []string{leaf, root}, 2, ""},
		{"both in one element", []string{leaf + root}, 2, ""},
		{"empty", nil, 0, "istioca: CreateCertificate returned no certificate"},
		{"not PEM", []string{"hello"}, 0, "istioca: chain element 0 has data that is not PEM"},
		{"trailing garbage", []string{leaf + "junk"}, 0, "istioca: chain element 0 has data that is not PEM"},
		{"a key", []string{string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}}))}, 0, `istioca: chain element 0 holds a "PRIVATE KEY" block`},
		{"bad DER", []string{string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2}}))}, 0, "istioca: chain element 0: x509: malformed certificate"},
		{"too large", []string{strings.Repeat("a", 70000)}, 0, "istioca: certificate chain over 65536 bytes"},
	} {
		got, err := ParseChain(tc.in)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%s: got %v, want %q", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil || len(got) != tc.n {
			t.Errorf("%s: got %d, %v", tc.name, len(got), err)
		}
	}
}

func TestSignNeedsRootsAndToken(t *testing.T) {
	key, _ := NewKey()
	_, err := (&Client{}).Sign(t.Context(), key, 0)
	if err == nil || err.Error() != "istioca: Client needs RootCAs and Token" {
		t.Fatalf("got %v", err)
	}
}

func FuzzParseChain(f *testing.F) {
	leaf, root := chainPEM(f)
	f.Add(leaf, root)
	f.Add(leaf+root, "")
	f.Add("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "x")
	f.Fuzz(func(t *testing.T, a, b string) {
		chain, err := ParseChain([]string{a, b})
		if err == nil && len(chain) == 0 {
			t.Fatal("no error and no certificate")
		}
	})
}

func TestSignUnreachable(t *testing.T) {
	key, _ := NewKey()
	c := &Client{Addr: "127.0.0.1:1", RootCAs: x509.NewCertPool(), Token: func(context.Context) (string, error) { return "t", nil }}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, err := c.Sign(ctx, key, 0)
	if err == nil || !strings.HasPrefix(err.Error(), "istioca: CreateCertificate at 127.0.0.1:1 refused: Unavailable: ") ||
		!strings.HasSuffix(err.Error(), "(istiod unreachable, or its serving certificate did not verify against RootCAs as istiod.istio-system.svc)") {
		t.Fatalf("got %v", err)
	}
}

func TestSignEmptyToken(t *testing.T) {
	key, _ := NewKey()
	c := &Client{RootCAs: x509.NewCertPool(), Token: func(context.Context) (string, error) { return "", nil }}
	if _, err := c.Sign(t.Context(), key, 0); err == nil || err.Error() != "istioca: the service-account token is empty" {
		t.Fatalf("got %v", err)
	}
	c.Token = func(context.Context) (string, error) { return "", os.ErrNotExist }
	if _, err := c.Sign(t.Context(), key, 0); err == nil || err.Error() != "istioca: getting the service-account token: file does not exist" {
		t.Fatalf("got %v", err)
	}
}
