// Package devca is an in-process certificate authority that mints SPIFFE X.509-SVIDs, for the
// embedded demo and for tests: every peer, Istio's own HBONE code included, can get a
// certificate chained to the same root.
package devca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// CA signs SVIDs for one trust domain. It is immutable after New.
type CA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  crypto.Signer
	now  func() time.Time
}

// New creates a CA for trustDomain with a fresh P-256 root valid for ten years.
func New(trustDomain string) (*CA, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, fmt.Errorf("devca: trust domain %q: %w", trustDomain, err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("devca: generating root key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"detour dev CA"}, CommonName: td.String()},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("devca: signing root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("devca: parsing root: %w", err)
	}
	return &CA{td: td, cert: cert, key: key, now: time.Now}, nil
}

// TrustDomain is the CA's trust domain.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// Root is the CA certificate.
func (ca *CA) Root() *x509.Certificate { return ca.cert }

// Bundle is the trust bundle holding the root.
func (ca *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
}

// Issue mints an SVID for id valid from notBefore to notAfter (zero: now-1m to now+24h, the
// Istio CA's default lifetime). The id must belong to the CA's trust domain unless foreign is set.
func (ca *CA) Issue(id string, notBefore, notAfter time.Time) (*x509svid.SVID, error) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return nil, fmt.Errorf("devca: SPIFFE ID %q: %w", id, err)
	}
	if !sid.MemberOf(ca.td) {
		return nil, fmt.Errorf("devca: %s is not in trust domain %s", sid, ca.td)
	}
	if notBefore.IsZero() {
		notBefore = ca.now().Add(-time.Minute)
	}
	if notAfter.IsZero() {
		notAfter = ca.now().Add(24 * time.Hour)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("devca: generating key: %w", err)
	}
	cert, err := ca.sign(sid, key.Public(), notBefore, notAfter)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: sid, Certificates: []*x509.Certificate{cert}, PrivateKey: key}, nil
}

// Sign certifies pub as id (which must be in the CA's trust domain) until notAfter: what a CA
// serving CSRs does.
func (ca *CA) Sign(id spiffeid.ID, pub crypto.PublicKey, notAfter time.Time) (*x509.Certificate, error) {
	if !id.MemberOf(ca.td) {
		return nil, fmt.Errorf("devca: %s is not in trust domain %s", id, ca.td)
	}
	return ca.sign(id, pub, ca.now().Add(-time.Minute), notAfter)
}

func (ca *CA) sign(id spiffeid.ID, pub crypto.PublicKey, notBefore, notAfter time.Time) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("devca: signing %s: %w", id, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("devca: parsing %s: %w", id, err)
	}
	return cert, nil
}

// ServerTLS is a TLS config presenting svid and requiring a client SVID from this CA's trust
// domain.
func (ca *CA) ServerTLS(svid *x509svid.SVID) *tls.Config {
	return tlsconfig.MTLSServerConfig(svid, ca.Bundle(), tlsconfig.AuthorizeMemberOf(ca.td))
}

// ClientTLS is a TLS config presenting svid and requiring the server to be serverID.
func (ca *CA) ClientTLS(svid *x509svid.SVID, serverID spiffeid.ID) *tls.Config {
	return tlsconfig.MTLSClientConfig(svid, ca.Bundle(), tlsconfig.AuthorizeID(serverID))
}

// Certificate converts an SVID to a tls.Certificate.
func Certificate(svid *x509svid.SVID) tls.Certificate {
	c := tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, cert := range svid.Certificates {
		c.Certificate = append(c.Certificate, cert.Raw)
	}
	return c
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("devca: reading randomness: %v", err))
	}
	return n
}

// Files in a dev CA directory.
const (
	rootFile = "ca.crt"
	keyFile  = "ca.key"
)

// Init creates a CA for trustDomain and saves it in dir (created 0700; the key 0600). It refuses
// to overwrite an existing CA.
func Init(dir, trustDomain string) (*CA, error) {
	if _, err := os.Stat(filepath.Join(dir, keyFile)); err == nil {
		return nil, fmt.Errorf("devca: %s already holds a CA; remove it first to start over", dir)
	}
	ca, err := New(trustDomain)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("devca: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(ca.key)
	if err != nil {
		return nil, fmt.Errorf("devca: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, keyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, fmt.Errorf("devca: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, rootFile), certPEM(ca.cert), 0o644); err != nil {
		return nil, fmt.Errorf("devca: %w", err)
	}
	return ca, nil
}

// Load opens the CA saved in dir by Init.
func Load(dir string) (*CA, error) {
	certBytes, err := os.ReadFile(filepath.Join(dir, rootFile))
	if err != nil {
		return nil, fmt.Errorf("devca: no CA in %s (run detour ca init): %w", dir, err)
	}
	keyBytes, err := os.ReadFile(filepath.Join(dir, keyFile))
	if err != nil {
		return nil, fmt.Errorf("devca: no CA key in %s: %w", dir, err)
	}
	cb, _ := pem.Decode(certBytes)
	kb, _ := pem.Decode(keyBytes)
	if cb == nil || kb == nil {
		return nil, fmt.Errorf("devca: %s: not PEM", dir)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("devca: %s: %w", rootFile, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("devca: %s: %w", keyFile, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok || len(cert.URIs) != 1 {
		return nil, fmt.Errorf("devca: %s does not hold a dev CA", dir)
	}
	td, err := spiffeid.TrustDomainFromString(cert.URIs[0].Host)
	if err != nil {
		return nil, fmt.Errorf("devca: %s: %w", rootFile, err)
	}
	return &CA{td: td, cert: cert, key: signer, now: time.Now}, nil
}

// WriteSVID saves an SVID as PREFIX.crt (chain), PREFIX.key (PKCS#8) and the CA's bundle as
// PREFIX.bundle.pem, the layout identity.Files reads.
func (ca *CA) WriteSVID(svid *x509svid.SVID, prefix string) error {
	var chain []byte
	for _, c := range svid.Certificates {
		chain = append(chain, certPEM(c)...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		return fmt.Errorf("devca: %w", err)
	}
	for name, data := range map[string][]byte{
		prefix + ".crt":        chain,
		prefix + ".key":        pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		prefix + ".bundle.pem": certPEM(ca.cert),
	} {
		if err := os.WriteFile(name, data, 0o600); err != nil {
			return fmt.Errorf("devca: %w", err)
		}
	}
	return nil
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}
