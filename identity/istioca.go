package identity

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/identity/istioca"
)

// DefaultRenewFraction: renew once half the lifetime has passed, as the Istio agent does
// (SECRET_GRACE_PERIOD_RATIO 0.5).
const DefaultRenewFraction = 0.5

// IstioCA gets the identity of the pod's service account from istiod's CA and renews it before
// it expires. The trust bundle is the mesh root from the istio-ca-root-cert ConfigMap mount. On a
// failed renewal it retries with backoff and keeps serving the current certificate.
type IstioCA struct {
	Client        *istioca.Client // Token and the CA address; RootCAs is filled from RootCertFile when nil
	RootCertFile  string          // root-cert.pem from the istio-ca-root-cert ConfigMap
	RootCert      []byte          // the same PEM in memory; used when RootCertFile is ""
	TrustDomain   string          // default "cluster.local"
	TTL           time.Duration   // requested lifetime; 0 lets istiod choose (24 h by default)
	RenewFraction float64         // of the lifetime, when to renew; 0 means DefaultRenewFraction
	Logger        *slog.Logger    // nil means slog.Default()

	Holder
}

// Fetch gets a new certificate once.
func (s *IstioCA) Fetch(ctx context.Context) (*Identity, error) {
	bundle, roots, err := s.bundle()
	if err != nil {
		return nil, err
	}
	key, err := istioca.NewKey()
	if err != nil {
		return nil, err
	}
	c := *s.Client
	if c.RootCAs == nil {
		c.RootCAs = roots
	}
	svid, err := c.Sign(ctx, key, s.TTL)
	if err != nil {
		return nil, err
	}
	id := &Identity{SVID: svid, Bundle: bundle}
	if err := validate(id); err != nil {
		return nil, fmt.Errorf("identity: istiod's certificate: %w", err)
	}
	return id, nil
}

func (s *IstioCA) bundle() (*x509bundle.Bundle, *x509.CertPool, error) {
	pemBytes, source := s.RootCert, "the mesh root"
	if s.RootCertFile != "" {
		var err error
		if pemBytes, err = os.ReadFile(s.RootCertFile); err != nil {
			return nil, nil, fmt.Errorf("identity: istio CA: reading the mesh root: %w", err)
		}
		source = s.RootCertFile
	} else if len(pemBytes) == 0 {
		return nil, nil, errors.New("identity: istio CA: RootCertFile (the istio-ca-root-cert mount) or RootCert is required")
	}
	td := s.TrustDomain
	if td == "" {
		td = "cluster.local"
	}
	trustDomain, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: istio CA: trust domain %q: %w", td, err)
	}
	b, err := x509bundle.Parse(trustDomain, pemBytes)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: istio CA: %s: %w", source, err)
	}
	if len(b.X509Authorities()) == 0 {
		return nil, nil, fmt.Errorf("identity: istio CA: %s holds no certificate", source)
	}
	pool := x509.NewCertPool()
	for _, c := range b.X509Authorities() {
		pool.AddCert(c)
	}
	return b, pool, nil
}

// Run keeps the identity current until ctx ends: a certificate now, then a new one at
// RenewFraction of each lifetime, retrying failures with backoff (1 s doubling to 1 min) while
// the current certificate is still served.
func (s *IstioCA) Run(ctx context.Context) error {
	log := s.Logger
	if log == nil {
		log = slog.Default()
	}
	frac := s.RenewFraction
	if frac <= 0 || frac >= 1 {
		frac = DefaultRenewFraction
	}
	backoff := time.Second
	for {
		var wait time.Duration
		id, err := s.Fetch(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			log.Warn("identity: renewing from istiod failed; the current certificate stays in use", "err", err, "retry", backoff)
			wait, backoff = backoff, min(2*backoff, time.Minute)
		} else {
			backoff = time.Second
			s.Set(id)
			leaf := id.SVID.Certificates[0]
			life := leaf.NotAfter.Sub(leaf.NotBefore)
			renew := leaf.NotBefore.Add(time.Duration(float64(life) * frac))
			// A backdated NotBefore must not make the renewal immediate: wait at least a tenth
			// of what is left, and a second.
			wait = max(time.Until(renew), time.Until(leaf.NotAfter)/10, time.Second)
			log.Info("identity: certificate from istiod", "id", id.SVID.ID.String(), "expires", leaf.NotAfter, "renew", renew)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}
