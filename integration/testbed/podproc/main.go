// Command podproc is what the test bed runs inside a pod's network namespace, so that every
// socket it opens, accepted or dialled, belongs to that pod:
//
//	podproc echo ADDR                            TCP echo server
//	podproc istio-hbone ADDR CERT KEY BUNDLE     Istio's own Go HBONE server (pkg/hbone), mutual TLS
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"

	istiohbone "istio.io/istio/pkg/hbone"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "podproc:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: podproc echo ADDR | podproc istio-hbone ADDR CERT KEY BUNDLE")
	}
	l, err := net.Listen("tcp", args[1])
	if err != nil {
		return err
	}
	switch args[0] {
	case "echo":
		for {
			c, err := l.Accept()
			if err != nil {
				return err
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	case "istio-hbone":
		if len(args) != 5 {
			return fmt.Errorf("usage: podproc istio-hbone ADDR CERT KEY BUNDLE")
		}
		cert, err := tls.LoadX509KeyPair(args[2], args[3])
		if err != nil {
			return err
		}
		bundle, err := os.ReadFile(args[4])
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(bundle) {
			return fmt.Errorf("no certificate in %s", args[4])
		}
		srv := istiohbone.NewServer()
		srv.Protocols.SetHTTP2(true)
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool,
			ClientAuth: tls.RequireAndVerifyClientCert, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13}
		return srv.ServeTLS(l, "", "")
	}
	return fmt.Errorf("unknown mode %q", args[0])
}
