// Package identity gives detour its SPIFFE identity and its peers' trust bundle, from whichever
// source the mesh uses (istiod's CA, a SPIFFE Workload API, PEM files, the dev CA), keeps them
// current, and builds the *tls.Config that HBONE and the developer tunnel use. Certificates are
// read at every handshake, so a rotation never restarts a listener.
package identity

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Identity is an X.509 SVID (chain and key) and the trust bundle its peers chain to. Immutable.
type Identity struct {
	SVID   *x509svid.SVID
	Bundle *x509bundle.Bundle
}

// Source gives the current identity, or nil before it has one, and a channel closed when that
// changes. Every source in this package implements it; so can a caller's.
type Source interface {
	Identity() (*Identity, <-chan struct{})
}

// ErrNoIdentity: a handshake came before the source had an identity. Handshakes fail closed.
var ErrNoIdentity = errors.New("identity: no identity yet")

// Wait blocks until src has an identity, or ctx ends.
func Wait(ctx context.Context, src Source) (*Identity, error) {
	for {
		id, changed := src.Identity()
		if id != nil {
			return id, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("identity: waiting for the first identity: %w", ctx.Err())
		}
	}
}

// Holder keeps the current identity and the channel that announces its replacement. Sources embed
// it; on its own it is a Source the caller sets (tests, embedders with their own renewal).
type Holder struct {
	mu      sync.Mutex
	cur     *Identity
	changed chan struct{}
}

// Identity implements Source.
func (h *Holder) Identity() (*Identity, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.changed == nil {
		h.changed = make(chan struct{})
	}
	return h.cur, h.changed
}

// Set replaces the identity and wakes every waiter.
func (h *Holder) Set(id *Identity) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cur = id
	if h.changed != nil {
		close(h.changed)
	}
	h.changed = make(chan struct{})
}

// Static is a Source whose identity never changes (tests, the dev CA demo).
func Static(id *Identity) Source {
	h := &Holder{}
	h.Set(id)
	return h
}

// validate checks (errors unprefixed: callers name the source) that an identity is usable: an SVID with a key, a bundle for its trust domain,
// and a chain that verifies against that bundle now.
func validate(id *Identity) error {
	if id == nil || id.SVID == nil || len(id.SVID.Certificates) == 0 || id.SVID.PrivateKey == nil {
		return errors.New("no certificate or key")
	}
	if id.Bundle == nil || len(id.Bundle.X509Authorities()) == 0 {
		return errors.New("the trust bundle is empty")
	}
	if !id.SVID.ID.MemberOf(id.Bundle.TrustDomain()) {
		return fmt.Errorf("%s is outside the bundle's trust domain %s", id.SVID.ID, id.Bundle.TrustDomain())
	}
	if _, _, err := x509svid.Verify(id.SVID.Certificates, id.Bundle); err != nil {
		return fmt.Errorf("%s does not verify against its bundle: %w", id.SVID.ID, err)
	}
	return nil
}

// sourceAdapter exposes a Source to go-spiffe's tlsconfig as an SVID and bundle source.
type sourceAdapter struct{ src Source }

func (a sourceAdapter) GetX509SVID() (*x509svid.SVID, error) {
	id, _ := a.src.Identity()
	if id == nil {
		return nil, ErrNoIdentity
	}
	return id.SVID, nil
}

func (a sourceAdapter) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	id, _ := a.src.Identity()
	if id == nil {
		return nil, ErrNoIdentity
	}
	if id.Bundle.TrustDomain() != td {
		return nil, fmt.Errorf("identity: no bundle for trust domain %s (ours is %s)", td, id.Bundle.TrustDomain())
	}
	return id.Bundle, nil
}
