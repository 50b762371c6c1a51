package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/hbone"
)

// drainTimeout bounds graceful shutdown on SIGTERM.
const drainTimeout = 10 * time.Second

// serve runs a plain HBONE endpoint: it terminates HBONE and forwards each stream to its target
// over TCP, as ztunnel's inbound does. Certificates come from PEM files.
type serve struct {
	listen, cert, key, ca string
	log                   func() *slog.Logger
}

func newServeCmd(log func() *slog.Logger) *cobra.Command {
	s := &serve{log: log}
	cmd := &cobra.Command{
		Use:   "hbone-serve",
		Short: "Terminate HBONE and forward each stream to its target over TCP",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return s.run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&s.listen, "listen", "127.0.0.1:15008", "address to listen on")
	cmd.Flags().StringVar(&s.cert, "cert", "", "PEM certificate chain (SPIFFE SVID) to present (required)")
	cmd.Flags().StringVar(&s.key, "key", "", "PEM private key (required)")
	cmd.Flags().StringVar(&s.ca, "ca", "", "PEM trust bundle that client certificates must chain to (required)")
	return cmd
}

func (s *serve) run(ctx context.Context) error {
	if s.cert == "" || s.key == "" || s.ca == "" {
		return errors.New("--cert, --key and --ca are required")
	}
	cert, err := tls.LoadX509KeyPair(s.cert, s.key)
	if err != nil {
		return fmt.Errorf("loading --cert/--key: %w", err)
	}
	pem, err := os.ReadFile(s.ca)
	if err != nil {
		return fmt.Errorf("reading --ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("--ca %s holds no PEM certificate", s.ca)
	}
	l, err := net.Listen("tcp", s.listen)
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	srv := &hbone.Server{
		Handler:   &hbone.Forwarder{},
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert},
		Logger:    s.log(),
	}
	s.log().Info("serving HBONE", "addr", l.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		drain, cancel := context.WithTimeout(context.Background(), drainTimeout)
		defer cancel()
		return srv.Shutdown(drain)
	}
}
