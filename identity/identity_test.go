package identity_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
)

const (
	serverID = "spiffe://cluster.local/ns/detour/sa/detour"
	clientID = "spiffe://cluster.local/ns/default/sa/sleep"
)

func newCA(t *testing.T) *devca.CA {
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func issue(t *testing.T, ca *devca.CA, id string) *identity.Identity {
	svid, err := ca.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return &identity.Identity{SVID: svid, Bundle: ca.Bundle()}
}

// mutable is a Source a test can rotate.
type mutable struct {
	cur     *identity.Identity
	changed chan struct{}
}

func (m *mutable) Identity() (*identity.Identity, <-chan struct{}) { return m.cur, m.changed }

// Rotation: streams opened before keep flowing, new handshakes get the new certificate, the
// listener is never restarted.
func TestRotationWithoutRestart(t *testing.T) {
	ca := newCA(t)
	first := issue(t, ca, serverID)
	src := &identity.Holder{}
	src.Set(first)
	cli := identity.Static(issue(t, ca, clientID))

	l, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &hbone.Server{Handler: hbone.HandlerFunc(func(s *hbone.Stream) error {
		s.Accept()
		_, err := io.Copy(s, s)
		s.CloseWrite()
		return err
	}), TLSConfig: identity.ServerTLS(src, nil)}
	go srv.Serve(l)
	defer srv.Close()
	clientTLS, err := identity.ClientTLS(cli, spiffeid.RequireFromString(serverID))
	if err != nil {
		t.Fatal(err)
	}
	dialNew := func() (*hbone.Stream, *hbone.Dialer) {
		d := &hbone.Dialer{}
		s, err := d.Dial(context.Background(), l.Addr().String(), "10.0.0.1:80", hbone.DialOptions{TLSConfig: clientTLS})
		if err != nil {
			t.Fatal(err)
		}
		return s, d
	}
	old, d1 := dialNew()
	defer d1.Close()
	second := issue(t, ca, serverID)
	src.Set(second)
	// The old stream still flows.
	old.Write([]byte("before"))
	buf := make([]byte, 6)
	if _, err := io.ReadFull(old, buf); err != nil || string(buf) != "before" {
		t.Fatalf("old stream: %q %v", buf, err)
	}
	// A new connection sees the new certificate.
	var seen []byte
	cfg := clientTLS.Clone()
	verify := cfg.VerifyPeerCertificate
	cfg.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509Cert) error {
		seen = raw[0]
		return verify(raw, chains)
	}
	d2 := &hbone.Dialer{}
	defer d2.Close()
	s2, err := d2.Dial(context.Background(), l.Addr().String(), "10.0.0.1:80", hbone.DialOptions{TLSConfig: cfg})
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if !bytes.Equal(seen, second.SVID.Certificates[0].Raw) {
		t.Fatal("a new handshake did not present the rotated certificate")
	}
	old.Close()
}

func TestClientTLSRefusesOtherServer(t *testing.T) {
	ca := newCA(t)
	src := identity.Static(issue(t, ca, "spiffe://cluster.local/ns/evil/sa/evil"))
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(src, nil)}
	go srv.Serve(l)
	defer srv.Close()
	cfg, _ := identity.ClientTLS(identity.Static(issue(t, ca, clientID)), spiffeid.RequireFromString(serverID))
	d := &hbone.Dialer{}
	defer d.Close()
	_, err := d.Dial(context.Background(), l.Addr().String(), "10.0.0.1:80", hbone.DialOptions{TLSConfig: cfg})
	if err == nil || !strings.Contains(err.Error(), `unexpected ID "spiffe://cluster.local/ns/evil/sa/evil"`) {
		t.Fatalf("got %v", err)
	}
	if _, err := identity.ClientTLS(src); err == nil || err.Error() != "identity: a client must expect at least one server identity" {
		t.Fatalf("got %v", err)
	}
}

func TestNoIdentityFailsClosed(t *testing.T) {
	var empty identity.Holder
	cfg := identity.ServerTLS(&empty, nil)
	if _, err := cfg.GetCertificate(&tls.ClientHelloInfo{}); err == nil || !strings.Contains(err.Error(), "no identity yet") {
		t.Fatalf("got %v", err)
	}
}

func writeFiles(t *testing.T, dir string, ca *devca.CA, svid *x509svid.SVID) *identity.Files {
	prefix := filepath.Join(dir, "id")
	if err := ca.WriteSVID(svid, prefix); err != nil {
		t.Fatal(err)
	}
	return &identity.Files{CertFile: prefix + ".crt", KeyFile: prefix + ".key", BundleFile: prefix + ".bundle.pem", Interval: 20 * time.Millisecond}
}

// Files: replaced files are picked up without restart; a half-written file is ignored until valid.
func TestFilesReload(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	a := issue(t, ca, serverID)
	f := writeFiles(t, dir, ca, a.SVID)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	defer func() { cancel(); <-done }()
	got, err := identity.Wait(ctx, f)
	if err != nil || got.SVID.Certificates[0].SerialNumber.Cmp(a.SVID.Certificates[0].SerialNumber) != 0 {
		t.Fatalf("first load: %v", err)
	}
	// Half-written certificate: ignored, the old identity stays.
	full, _ := os.ReadFile(f.CertFile)
	os.WriteFile(f.CertFile, full[:len(full)/2], 0o600)
	time.Sleep(200 * time.Millisecond)
	if cur, _ := f.Identity(); cur.SVID.Certificates[0].SerialNumber.Cmp(a.SVID.Certificates[0].SerialNumber) != 0 {
		t.Fatal("a half-written file replaced the identity")
	}
	// A new valid set is picked up.
	b := issue(t, ca, serverID)
	_, changed := f.Identity()
	writeFiles(t, dir, ca, b.SVID)
	select {
	case <-changed:
	case <-time.After(5 * time.Second):
		t.Fatal("the new files were not picked up")
	}
	if cur, _ := f.Identity(); cur.SVID.Certificates[0].SerialNumber.Cmp(b.SVID.Certificates[0].SerialNumber) != 0 {
		t.Fatal("wrong identity after reload")
	}
}

func TestFilesErrors(t *testing.T) {
	ca := newCA(t)
	other, _ := devca.New("other.org")
	otherSVID, _ := other.Issue("spiffe://other.org/ns/a/sa/b", time.Time{}, time.Time{})
	expired, _ := ca.Issue(serverID, time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour))
	for _, tc := range []struct {
		name  string
		setup func(f *identity.Files)
		want  string
	}{
		{"missing key", func(f *identity.Files) { os.Remove(f.KeyFile) }, "identity: files: reading the key: open KEY: no such file or directory"},
		{"empty bundle", func(f *identity.Files) { os.WriteFile(f.BundleFile, nil, 0o600) }, "identity: files: the trust bundle is empty"},
		{"bundle from another CA", func(f *identity.Files) { os.WriteFile(f.BundleFile, pemOf(other), 0o600) }, "identity: files: spiffe://cluster.local/ns/detour/sa/detour does not verify against its bundle: x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority"},
		{"expired", func(f *identity.Files) { ca.WriteSVID(expired, strings.TrimSuffix(f.CertFile, ".crt")) }, "identity: files: spiffe://cluster.local/ns/detour/sa/detour does not verify against its bundle: x509svid: could not verify leaf certificate: x509: certificate has expired or is not yet valid"},
		{"key of another certificate", func(f *identity.Files) {
			dir := t.TempDir()
			other := writeFiles(t, dir, other, otherSVID)
			k, _ := os.ReadFile(other.KeyFile)
			os.WriteFile(f.KeyFile, k, 0o600)
		}, "identity: files: CERT and KEY: x509svid: private key validation failed: leaf certificate does not match private key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := writeFiles(t, t.TempDir(), ca, issue(t, ca, serverID).SVID)
			tc.setup(f)
			_, err := f.Fetch()
			want := strings.NewReplacer("KEY", f.KeyFile, "CERT", f.CertFile).Replace(tc.want)
			if err == nil || !strings.HasPrefix(err.Error(), want) {
				t.Fatalf("got  %v\nwant %s", err, want)
			}
		})
	}
}

func pemOf(ca *devca.CA) []byte {
	var b bytes.Buffer
	pemEncode(&b, ca.Root().Raw)
	return b.Bytes()
}
