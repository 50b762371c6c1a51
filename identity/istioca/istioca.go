// Package istioca gets workload certificates from istiod's CA: a CSR sent with
// IstioCertificateService.CreateCertificate over TLS, authenticated by a Kubernetes
// service-account token whose audience is istio-ca. istiod ignores the CSR's names and issues the
// SPIFFE ID of the token's service account.
package istioca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

// Defaults, as Istio's agent uses them.
const (
	DefaultAddr       = "istiod.istio-system.svc:15012"
	DefaultServerName = "istiod.istio-system.svc"
	DefaultClusterID  = "Kubernetes"
	// maxChainBytes bounds the response we parse.
	maxChainBytes = 64 << 10
)

// Client asks istiod's CA for certificates. It is immutable once used.
type Client struct {
	Addr       string         // default DefaultAddr
	ServerName string         // the name istiod's serving certificate must carry; default DefaultServerName
	RootCAs    *x509.CertPool // verifies istiod's serving certificate (the mesh root); required
	ClusterID  string         // sent as ClusterID metadata; default DefaultClusterID
	// Token returns a service-account token with audience istio-ca; required.
	Token func(ctx context.Context) (string, error)
}

// Sign asks for a certificate for key, valid for ttl (0: istiod's default), and returns the
// verified-shape SVID: the chain istiod sent, leaf first, with key.
func (c *Client) Sign(ctx context.Context, key crypto.Signer, ttl time.Duration) (*x509svid.SVID, error) {
	if c.RootCAs == nil || c.Token == nil {
		return nil, errors.New("istioca: Client needs RootCAs and Token")
	}
	addr := or(c.Addr, DefaultAddr)
	token, err := c.Token(ctx)
	if err != nil {
		return nil, fmt.Errorf("istioca: getting the service-account token: %w", err)
	}
	if token == "" {
		return nil, errors.New("istioca: the service-account token is empty")
	}
	csr, err := NewCSR(key)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs:    c.RootCAs,
		ServerName: or(c.ServerName, DefaultServerName),
		MinVersion: tls.VersionTLS12,
	})))
	if err != nil {
		return nil, fmt.Errorf("istioca: connecting to %s: %w", addr, err)
	}
	defer conn.Close()
	clusterID := or(c.ClusterID, DefaultClusterID)
	md, err := structpb.NewStruct(map[string]any{"ClusterID": clusterID})
	if err != nil {
		return nil, fmt.Errorf("istioca: %w", err)
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token, "ClusterID", clusterID)
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(csr),
		ValidityDuration: int64(ttl / time.Second),
		Metadata:         md,
	})
	if err != nil {
		st := status.Convert(err)
		hint := ""
		switch st.Code() {
		case codes.Unauthenticated:
			hint = " (istiod could not authenticate the service-account token: its audience must be istio-ca, its service account must exist, and ClusterID must match istiod's)"
		case codes.Unavailable:
			hint = " (istiod unreachable, or its serving certificate did not verify against RootCAs as " + or(c.ServerName, DefaultServerName) + ")"
		}
		return nil, fmt.Errorf("istioca: CreateCertificate at %s refused: %s: %s%s", addr, st.Code(), st.Message(), hint)
	}
	chain, err := ParseChain(resp.GetCertChain())
	if err != nil {
		return nil, err
	}
	return svidFrom(chain, key)
}

// NewKey makes a P-256 ECDSA key, the kind ztunnel and the Istio agent use.
func NewKey() (crypto.Signer, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("istioca: generating a key: %w", err)
	}
	return k, nil
}

// NewCSR makes a PEM CSR for key. istiod sets the certificate's identity from the token, so the
// CSR carries only a placeholder URI.
func NewCSR(key crypto.Signer) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/unknown/sa/unknown"}},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("istioca: creating a CSR: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ParseChain decodes CreateCertificate's cert_chain: PEM strings, leaf first, each holding one or
// more certificates. It rejects anything but CERTIFICATE blocks, trailing garbage, an empty chain
// and responses over 64 KiB.
func ParseChain(pems []string) ([]*x509.Certificate, error) {
	total := 0
	var chain []*x509.Certificate
	for i, s := range pems {
		total += len(s)
		if total > maxChainBytes {
			return nil, fmt.Errorf("istioca: certificate chain over %d bytes", maxChainBytes)
		}
		rest := []byte(s)
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				return nil, fmt.Errorf("istioca: chain element %d holds a %q block", i, block.Type)
			}
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("istioca: chain element %d: %w", i, err)
			}
			chain = append(chain, cert)
		}
		if len(bytes.TrimSpace(rest)) > 0 {
			return nil, fmt.Errorf("istioca: chain element %d has data that is not PEM", i)
		}
	}
	if len(chain) == 0 {
		return nil, errors.New("istioca: CreateCertificate returned no certificate")
	}
	return chain, nil
}

// svidFrom checks that the leaf certifies key and carries one SPIFFE ID, and builds the SVID.
func svidFrom(chain []*x509.Certificate, key crypto.Signer) (*x509svid.SVID, error) {
	leaf := chain[0]
	pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("istioca: the issued certificate is not for our key")
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, fmt.Errorf("istioca: the issued certificate has no SPIFFE ID: %w", err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

func or(v, d string) string {
	if v == "" {
		return d
	}
	return v
}
