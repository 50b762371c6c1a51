package hbone_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/identity/devca/devcatest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	serverID = "spiffe://cluster.local/ns/detour/sa/waypoint"
	clientID = "spiffe://cluster.local/ns/default/sa/client"
)

// pki is a CA with a server and a client identity.
type pki struct {
	ca        *devca.CA
	serverTLS *tls.Config
	clientTLS *tls.Config
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	pr := devcatest.NewPair(t, serverID, clientID)
	return &pki{ca: pr.CA, serverTLS: pr.ServerTLS, clientTLS: pr.ClientTLS}
}

// echoServer echoes every connection and half-closes after the client's FIN. It returns the
// address; it stops when the test ends.
func echoServer(t *testing.T) string {
	return backend(t, func(c *net.TCPConn) {
		io.Copy(c, c)
		c.CloseWrite()
	})
}

// startServer runs an hbone.Server with h on a loopback port and closes it when the test ends.
func startServer(t testing.TB, p *pki, h hbone.Handler) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &hbone.Server{Handler: h, TLSConfig: p.serverTLS, Logger: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return l.Addr().String()
}

func newDialer(t testing.TB) *hbone.Dialer {
	d := &hbone.Dialer{}
	t.Cleanup(func() { d.Close() })
	return d
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
