// Package devcatest sets up the identities of tests that run a real mutual-TLS peer on each side.
package devcatest

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
)

// Pair is an in-memory CA (trust domain cluster.local) with a server and a client identity issued
// from it: the server's TLS config, and the client's that presents the client identity and
// accepts only the server's.
type Pair struct {
	CA        *devca.CA
	ServerTLS *tls.Config
	ClientTLS *tls.Config
}

// NewPair issues serverID and clientID (SPIFFE IDs in cluster.local) from a new CA; it fails t
// on any error.
func NewPair(t testing.TB, serverID, clientID string) *Pair {
	t.Helper()
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.Issue(serverID, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := ca.Issue(clientID, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return &Pair{CA: ca, ServerTLS: ca.ServerTLS(srv), ClientTLS: ca.ClientTLS(cli, spiffeid.RequireFromString(serverID))}
}

// Source issues id (a SPIFFE ID in cluster.local) from the pair's CA, with no expiry of its own,
// as a static identity source trusting the CA; it fails t on any error.
func (p *Pair) Source(t testing.TB, id string) identity.Source {
	t.Helper()
	svid, err := p.CA.Issue(id, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return identity.Static(&identity.Identity{SVID: svid, Bundle: p.CA.Bundle()})
}
