package waypoint_test

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/detour-mesh/detour/hbone"
)

// Streams of different clients never share an onward connection (pooled per source identity, as
// ztunnel pools per source workload), so one client's unread streams cannot take the connection
// window another client needs; streams of one client still share.
func TestOnwardConnectionsPerClient(t *testing.T) {
	b := newBed(t, "echo")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	clients := map[string]hbone.DialOptions{
		`for="10.1.1.1:1"`: b.clientOpts(t, "spiffe://cluster.local/ns/default/sa/sleep"),
		`for="10.1.1.2:1"`: b.clientOpts(t, "spiffe://cluster.local/ns/other/sa/noisy"),
	}
	for i := range 6 {
		for fwd, opts := range clients {
			opts.Forwarded = fwd
			s, err := b.client.Dial(ctx, b.waypoint, "10.96.0.10:80", opts)
			if err != nil {
				t.Fatalf("stream %d of %s: %v", i, fwd, err)
			}
			io.WriteString(s, "x")
			s.CloseWrite()
			io.ReadAll(s)
			s.Close()
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	owner := map[string]string{}    // onward connection -> the client whose streams it carried
	perEndpoint := map[string]int{} // client and endpoint -> onward connections
	for _, o := range b.onward {
		if prev, ok := owner[o.conn]; ok && prev != o.forwarded {
			t.Fatalf("onward connection %s carried streams of two clients (%s and %s)", o.conn, prev, o.forwarded)
		}
		if _, ok := owner[o.conn]; !ok {
			ep, _, _ := strings.Cut(o.conn, "<-")
			perEndpoint[o.forwarded+" to "+ep]++
		}
		owner[o.conn] = o.forwarded
	}
	for k, n := range perEndpoint {
		if n != 1 { // a client's own streams to one endpoint share a connection
			t.Errorf("client %s: %d onward connections, want 1", k, n)
		}
	}
}
