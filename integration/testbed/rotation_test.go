package testbed_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/istioca"
	"github.com/detour-mesh/detour/integration/testbed"
)

// The Istio CA source renews a short-lived certificate from the real istiod: a stream opened
// before the rotations keeps flowing, new handshakes get the new certificate, the listener is
// never restarted.
func TestIstioCASourceRotation(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := c.Namespace(ctx, "demo", nil); err != nil {
		t.Fatal(err)
	}
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Istiod.Root.Raw}), 0o644)
	src := &identity.IstioCA{
		Client: &istioca.Client{Addr: c.Istiod.CAAddr, ServerName: c.Istiod.ServerName,
			Token: func(ctx context.Context) (string, error) {
				return c.ServiceAccountToken(ctx, "demo", "detour", "istio-ca")
			}},
		RootCertFile: rootFile,
		TTL:          20 * time.Second,
		Logger:       slog.New(slog.DiscardHandler),
	}
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	defer func() { cancel(); <-done }()
	first, err := identity.Wait(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	if first.SVID.ID.String() != "spiffe://cluster.local/ns/demo/sa/detour" {
		t.Fatalf("got %s", first.SVID.ID)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &hbone.Server{Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
		s.Accept()
		_, err := io.Copy(s, s)
		s.CloseWrite()
		return err
	}), TLSConfig: identity.ServerTLS(src, nil), Logger: slog.New(slog.DiscardHandler)}
	go srv.Serve(l)
	defer srv.Close()
	client, err := c.Workload(ctx, "demo", "sleep")
	if err != nil {
		t.Fatal(err)
	}
	clientTLS, err := identity.ClientTLS(identity.Static(&identity.Identity{SVID: client.SVID, Bundle: client.Bundle}), first.SVID.ID)
	if err != nil {
		t.Fatal(err)
	}
	d := &hbone.Dialer{}
	defer d.Close()
	old, err := d.Dial(ctx, l.Addr().String(), "10.0.0.1:80", hbone.DialOptions{TLSConfig: clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()

	// Keep the old stream busy through two rotations.
	serials := map[string]bool{first.SVID.Certificates[0].SerialNumber.String(): true}
	msg := bytes.Repeat([]byte("x"), 32<<10)
	buf := make([]byte, len(msg))
	for len(serials) < 3 {
		if ctx.Err() != nil {
			t.Fatalf("saw %d certificates before the deadline", len(serials))
		}
		if _, err := old.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(old, buf); err != nil {
			t.Fatalf("the stream opened before the rotation broke: %v", err)
		}
		cur, _ := src.Identity()
		serials[cur.SVID.Certificates[0].SerialNumber.String()] = true
		time.Sleep(20 * time.Millisecond)
	}
	// A new handshake presents the current certificate.
	var seen *x509.Certificate
	cfg := clientTLS.Clone()
	cfg.VerifyConnection = func(cs tls.ConnectionState) error { seen = cs.PeerCertificates[0]; return nil }
	d2 := &hbone.Dialer{}
	defer d2.Close()
	s2, err := d2.Dial(ctx, l.Addr().String(), "10.0.0.1:80", hbone.DialOptions{TLSConfig: cfg, ServerID: "new"})
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
	cur, _ := src.Identity()
	if !seen.Equal(cur.SVID.Certificates[0]) {
		t.Fatal("a new handshake did not present the current certificate")
	}
	if seen.SerialNumber.Cmp(first.SVID.Certificates[0].SerialNumber) == 0 {
		t.Fatal("still the first certificate")
	}
}
