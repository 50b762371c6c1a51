package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
)

// demo runs detour's data path on an embedded default: a dev CA, an HBONE server on loopback
// forwarding to an echo backend, and a client sending streams through it. No cluster needed.
type demo struct {
	streams int
	size    int
	log     func() *slog.Logger
}

func newDemoCmd(log func() *slog.Logger) *cobra.Command {
	d := &demo{log: log}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run an HBONE round trip on loopback with a built-in CA (no cluster needed)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if d.streams < 1 || d.streams > 10000 {
				return fmt.Errorf("--streams must be 1..10000, got %d", d.streams)
			}
			if d.size < 0 || d.size > 1<<30 {
				return fmt.Errorf("--bytes must be 0..1073741824, got %d", d.size)
			}
			return d.run(cmd.Context(), cmd.OutOrStdout())
		},
	}
	cmd.Flags().IntVar(&d.streams, "streams", 8, "concurrent HBONE streams to open")
	cmd.Flags().IntVar(&d.size, "bytes", 4<<20, "bytes each stream sends and expects echoed")
	return cmd
}

const (
	demoServerID = "spiffe://cluster.local/ns/detour/sa/detour"
	demoClientID = "spiffe://cluster.local/ns/default/sa/sleep"
)

func (d *demo) run(ctx context.Context, out io.Writer) error {
	ca, err := devca.New("cluster.local")
	if err != nil {
		return err
	}
	srvSVID, err := ca.Issue(demoServerID, time.Time{}, time.Time{})
	if err != nil {
		return err
	}
	cliSVID, err := ca.Issue(demoClientID, time.Time{}, time.Time{})
	if err != nil {
		return err
	}
	echo, stopEcho, err := startEcho()
	if err != nil {
		return err
	}
	defer stopEcho()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	srvID := identity.Static(&identity.Identity{SVID: srvSVID, Bundle: ca.Bundle()})
	srv := &hbone.Server{Handler: &hbone.Forwarder{}, TLSConfig: identity.ServerTLS(srvID, nil), Logger: d.log()}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	defer func() {
		srv.Close()
		<-served
	}()
	fmt.Fprintf(out, "HBONE server %s as %s (dev CA, trust domain cluster.local)\n", l.Addr(), demoServerID)
	fmt.Fprintf(out, "echo backend %s\n", echo)

	dialer := &hbone.Dialer{Logger: d.log()}
	defer dialer.Close()
	clientTLS, err := identity.ClientTLS(identity.Static(&identity.Identity{SVID: cliSVID, Bundle: ca.Bundle()}),
		spiffeid.RequireFromString(demoServerID))
	if err != nil {
		return err
	}
	opts := hbone.DialOptions{
		TLSConfig: clientTLS,
		ServerID:  demoServerID,
		LocalID:   demoClientID,
		Forwarded: hbone.FormatForwarded(hbone.ForwardedElement{For: "127.0.0.1:40000"}),
	}
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	for i := range d.streams {
		g.Go(func() error { return d.roundTrip(gctx, dialer, l.Addr().String(), echo, opts, i) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	el := time.Since(start)
	total := float64(2 * d.size * d.streams)
	fmt.Fprintf(out, "%d streams x %d bytes echoed through HBONE, checksums match, in %v (%.0f MB/s both ways)\n",
		d.streams, d.size, el.Round(time.Millisecond), total/el.Seconds()/1e6)
	return nil
}

// roundTrip sends size random bytes on one stream, half-closes, and checks the echo.
func (d *demo) roundTrip(ctx context.Context, dialer *hbone.Dialer, proxy, echo string, opts hbone.DialOptions, i int) error {
	s, err := dialer.Dial(ctx, proxy, echo, opts)
	if err != nil {
		return err
	}
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Reset(0x8) })
	defer stop()
	want := sha256.New()
	errc := make(chan error, 1)
	go func() {
		_, err := io.CopyN(io.MultiWriter(s, want), rand.Reader, int64(d.size))
		errc <- errors.Join(err, s.CloseWrite())
	}()
	got := sha256.New()
	n, err := io.Copy(got, s)
	if err := errors.Join(err, <-errc); err != nil {
		return fmt.Errorf("stream %d: %w", i, err)
	}
	if n != int64(d.size) || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		return fmt.Errorf("stream %d: echo mismatch: %d bytes back of %d", i, n, d.size)
	}
	return nil
}

// startEcho runs a TCP echo server that half-closes after the client's FIN.
func startEcho() (string, func(), error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, fmt.Errorf("listening: %w", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return l.Addr().String(), func() { l.Close(); wg.Wait() }, nil
}
