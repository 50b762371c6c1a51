package waypoint_test

import (
	"testing"
	"time"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"go.uber.org/goleak"
)

// Every stream's goroutines (HTTP server, onward transports, splices) end with the stream.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testCA is an in-memory CA of trust domain cluster.local, and a function issuing identities from it.
func testCA(t *testing.T) (*devca.CA, func(spiffeID string) identity.Source) {
	t.Helper()
	ca, err := devca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	return ca, func(s string) identity.Source {
		svid, err := ca.Issue(s, time.Time{}, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		return identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()})
	}
}
