package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/identity/istioca"
)

// caServer is a real gRPC IstioCertificateService signing with a dev CA; it can be made to fail.
type caServer struct {
	pb.UnimplementedIstioCertificateServiceServer
	ca    *devca.CA
	down  atomic.Bool
	calls atomic.Int32
}

func (s *caServer) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	s.calls.Add(1)
	if s.down.Load() {
		return nil, status.Error(codes.Internal, "CA is down")
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("authorization"); len(v) != 1 || v[0] != "Bearer good-token" {
		return nil, status.Error(codes.Unauthenticated, "request authenticate failure")
	}
	block, _ := pem.Decode([]byte(req.Csr))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "bad CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	leaf, err := s.ca.Sign(spiffeid.RequireFromString(serverID), csr.PublicKey, time.Now().Add(time.Duration(req.ValidityDuration)*time.Second))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	enc := func(c *x509.Certificate) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	return &pb.IstioCertificateResponse{CertChain: []string{enc(leaf), enc(s.ca.Root())}}, nil
}

// servingCert is a self-signed certificate for istiod's name.
func servingCert(t *testing.T) (tls.Certificate, *x509.CertPool) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "istiod"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"istiod.istio-system.svc"}, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		IsCA: true, BasicConstraintsValid: true, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, pool
}

// A failed renewal keeps the current certificate in use and is retried with backoff; once the CA
// is back, the next certificate arrives.
func TestIstioCARenewalSurvivesOutage(t *testing.T) {
	ca := newCA(t)
	serving, pool := servingCert(t)
	srv := grpc.NewServer(grpc.Creds(credentials.NewServerTLSFromCert(&serving)))
	api := &caServer{ca: ca}
	pb.RegisterIstioCertificateServiceServer(srv, api)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(l)
	defer srv.Stop()
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	os.WriteFile(root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root().Raw}), 0o644)

	src := &identity.IstioCA{
		Client:       &istioca.Client{Addr: l.Addr().String(), RootCAs: pool, Token: func(context.Context) (string, error) { return "good-token", nil }},
		RootCertFile: root,
		TTL:          4 * time.Second,
		Logger:       slog.New(slog.DiscardHandler),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	defer func() { cancel(); <-done }()
	first, err := identity.Wait(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	api.down.Store(true)
	before := api.calls.Load()
	time.Sleep(3 * time.Second) // past the renewal point: renewals fail
	if api.calls.Load() <= before {
		t.Fatal("no renewal was attempted")
	}
	if cur, _ := src.Identity(); !cur.SVID.Certificates[0].Equal(first.SVID.Certificates[0]) {
		t.Fatal("the identity changed during the outage")
	}
	_, changed := src.Identity()
	api.down.Store(false)
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("no new certificate after the CA came back")
	}
	if cur, _ := src.Identity(); cur.SVID.Certificates[0].Equal(first.SVID.Certificates[0]) {
		t.Fatal("still the first certificate")
	}
}

func TestIstioCAErrors(t *testing.T) {
	ca := newCA(t)
	serving, pool := servingCert(t)
	srv := grpc.NewServer(grpc.Creds(credentials.NewServerTLSFromCert(&serving)))
	pb.RegisterIstioCertificateServiceServer(srv, &caServer{ca: ca})
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(l)
	defer srv.Stop()
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	os.WriteFile(root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root().Raw}), 0o644)
	empty := filepath.Join(t.TempDir(), "empty.pem")
	os.WriteFile(empty, nil, 0o644)
	mk := func(token, rootFile string) *identity.IstioCA {
		return &identity.IstioCA{Client: &istioca.Client{Addr: l.Addr().String(), RootCAs: pool,
			Token: func(context.Context) (string, error) { return token, nil }}, RootCertFile: rootFile}
	}
	for _, tc := range []struct {
		name string
		src  *identity.IstioCA
		want string
	}{
		{"bad token", mk("bad", root), "istioca: CreateCertificate at " + l.Addr().String() + " refused: Unauthenticated: request authenticate failure (istiod could not authenticate the service-account token: its audience must be istio-ca, its service account must exist, and ClusterID must match istiod's)"},
		{"no root file", mk("good-token", ""), "identity: istio CA: RootCertFile (the istio-ca-root-cert mount) or RootCert is required"},
		{"empty root", mk("good-token", empty), "identity: istio CA: " + empty + " holds no certificate"},
	} {
		_, err := tc.src.Fetch(context.Background())
		if err == nil || err.Error() != tc.want {
			t.Errorf("%s:\n got  %v\n want %s", tc.name, err, tc.want)
		}
	}
}
