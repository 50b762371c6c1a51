package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// curves are ztunnel's key-exchange groups, in its order (rustls aws-lc defaults, istio/ztunnel
// src/tls/lib.rs): X25519, P-256, P-384, then the hybrid post-quantum group.
var curves = []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384, tls.X25519MLKEM768}

// harden applies HBONE's TLS rules: TLS 1.3 only (whose suites Go fixes to AES-GCM and
// ChaCha20; ztunnel offers the two AES-GCM ones), ALPN h2, ztunnel's curves.
func harden(c *tls.Config) *tls.Config {
	c.MinVersion = tls.VersionTLS13
	c.NextProtos = []string{"h2"}
	c.CurvePreferences = slices.Clone(curves)
	return c
}

// ServerTLS is a server config presenting src's SVID and requiring a client SVID that chains to
// src's bundle and that authorize accepts (nil: any member of the trust domain, ztunnel's rule).
// The peer's ID is then in the connection's certificate (hbone.Request.PeerID).
func ServerTLS(src Source, authorize tlsconfig.Authorizer) *tls.Config {
	a := sourceAdapter{src}
	if authorize == nil {
		authorize = memberOfOwnDomain(src)
	}
	return harden(tlsconfig.MTLSServerConfig(a, a, authorize))
}

// ClientTLS is a client config presenting src's SVID and requiring the server to be one of
// expect (ztunnel checks the one identity it expects). At least one ID is required.
func ClientTLS(src Source, expect ...spiffeid.ID) (*tls.Config, error) {
	if len(expect) == 0 {
		return nil, errors.New("identity: a client must expect at least one server identity")
	}
	a := sourceAdapter{src}
	return harden(tlsconfig.MTLSClientConfig(a, a, tlsconfig.AuthorizeOneOf(expect...))), nil
}

// ClientTLSAuthorized is a client config presenting src's SVID and accepting a server that
// authorize accepts (nil: any member of src's trust domain). For reversed connections, where the
// side that accepted TCP runs the TLS client (detour's developer tunnel over HTTP/2).
func ClientTLSAuthorized(src Source, authorize tlsconfig.Authorizer) *tls.Config {
	a := sourceAdapter{src}
	if authorize == nil {
		authorize = memberOfOwnDomain(src)
	}
	return harden(tlsconfig.MTLSClientConfig(a, a, authorize))
}

func memberOfOwnDomain(src Source) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		own, _ := src.Identity()
		if own == nil {
			return ErrNoIdentity
		}
		if !id.MemberOf(own.Bundle.TrustDomain()) {
			return fmt.Errorf("identity: peer %s is outside trust domain %s", id, own.Bundle.TrustDomain())
		}
		return nil
	}
}
