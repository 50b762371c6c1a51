// Command podproc is what the test bed runs inside a pod's network namespace, so that every
// socket it opens, accepted or dialled, belongs to that pod:
//
//	podproc echo ADDR [GREETING]                 TCP echo server (writes GREETING and a newline first)
//	podproc http ADDR NAME                       HTTP server answering each request "NAME METHOD PATH"
//	podproc istio-hbone ADDR CERT KEY BUNDLE     Istio's own Go HBONE server (pkg/hbone), mutual TLS
//	podproc sidecar                              a stand-in Istio sidecar (run it as uid 1337): 15006
//	                                             forwards inbound connections to the app from 127.0.0.6,
//	                                             15001 outbound ones to their original destination
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"

	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/detour-mesh/detour/agent"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "podproc:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 1 && args[0] == "sidecar" {
		return sidecar()
	}
	if len(args) < 2 {
		return fmt.Errorf("usage: podproc echo ADDR | podproc http ADDR NAME | podproc istio-hbone ADDR CERT KEY BUNDLE")
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
				if len(args) > 2 {
					io.WriteString(c, args[2]+"\n")
				}
				io.Copy(c, c)
			}()
		}
	case "http":
		if len(args) != 3 {
			return fmt.Errorf("usage: podproc http ADDR NAME")
		}
		return http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s %s", args[2], r.Method, r.URL.Path)
		}))
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

// sidecar forwards what Istio's rules redirect to 15006 (inbound) and 15001 (outbound) the way
// Envoy does: inbound to the original destination from 127.0.0.6, outbound to the original
// destination.
func sidecar() error {
	in, err := net.Listen("tcp", "0.0.0.0:15006")
	if err != nil {
		return err
	}
	out, err := net.Listen("tcp", "0.0.0.0:15001")
	if err != nil {
		return err
	}
	forward := func(l net.Listener, d *net.Dialer) error {
		for {
			c, err := l.Accept()
			if err != nil {
				return err
			}
			go func() {
				defer c.Close()
				orig, err := agent.OriginalDst(c.(*net.TCPConn))
				if err != nil {
					fmt.Fprintln(os.Stderr, "sidecar:", err)
					return
				}
				// A connection made to the listener itself (a readiness probe, not redirected)
				// has itself as original destination: forwarding it would dial this listener
				// again, and again, until the process runs out of descriptors.
				if int(orig.Port()) == l.Addr().(*net.TCPAddr).Port {
					return
				}
				up, err := d.Dial("tcp", orig.String())
				if err != nil {
					fmt.Fprintln(os.Stderr, "sidecar:", err)
					return
				}
				defer up.Close()
				go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
				io.Copy(c, up)
			}()
		}
	}
	go forward(out, &net.Dialer{})
	return forward(in, &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 6)}})
}
