// Command podapp is the program of the test bed node's two local images (no registry is reachable,
// so they are built here, see image.NodeImages):
//
//	podapp pause          the pod sandbox's process: waits for SIGTERM or SIGINT, reaps orphans
//	podapp serve ADDR     a test app: GET / answers the pod's hostname, GET /token the pod's
//	                      ServiceAccount token as mounted by the kubelet, GET /kube the API
//	                      server's /version as the pod reaches it in-cluster (the kubernetes
//	                      Service's ClusterIP, the mounted CA and token; 502 with the error),
//	                      GET /peer the remote address the app saw (IP:port), GET /fetch?url=U
//	                      the pod's own GET of U answered as "STATUS BODY" (502 with the error),
//	                      with a request header for each header=NAME:VALUE,
//	                      so that a test drives traffic from inside a pod over plain HTTP
//	podapp env            prints its environment, NAME=VALUE lines sorted (what the kubelet and
//	                      the runtime gave the container, read by exec)
//
// It uses the standard library only, so that it builds static and small.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"
)

// tokenPath is where the kubelet mounts a pod's ServiceAccount token (the projected
// kube-api-access volume the ServiceAccount admission plugin adds).
const (
	tokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	caPath    = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "podapp:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	switch {
	case len(args) == 1 && args[0] == "pause":
		return pause()
	case len(args) == 2 && args[0] == "serve":
		return serve(args[1])
	case len(args) == 1 && args[0] == "env":
		env := os.Environ()
		sort.Strings(env)
		for _, kv := range env {
			fmt.Println(kv)
		}
		return nil
	}
	return errors.New("usage: podapp pause | podapp serve ADDR | podapp env")
}

// pause does what a sandbox's process must: nothing, until told to stop; as PID 1 of the pod's
// PID namespace (when shared) it also reaps children that others leave behind.
func pause() error {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return nil
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
	return nil
}

// serve runs the test app until SIGTERM (as PID 1 of its container a signal without a handler
// would be ignored, and the kubelet would wait out the grace period).
func serve(addr string) error {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; os.Exit(0) }()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		h, _ := os.Hostname()
		fmt.Fprintln(w, h)
	})
	mux.HandleFunc("GET /token", func(w http.ResponseWriter, _ *http.Request) {
		b, err := os.ReadFile(tokenPath)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Write(b)
	})
	mux.HandleFunc("GET /peer", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, r.RemoteAddr)
	})
	mux.HandleFunc("GET /fetch", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		status, body, err := fetch(q.Get("url"), q["header"])
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		fmt.Fprintf(w, "%d %s", status, body)
	})
	mux.HandleFunc("GET /kube", func(w http.ResponseWriter, _ *http.Request) {
		status, body, err := kubeVersion()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		w.WriteHeader(status)
		w.Write(body)
	})
	return http.ListenAndServe(addr, mux)
}

// fetch GETs url from inside the pod on a new connection (no keep-alive: each fetch is one
// connection the mesh sees) with headers (each NAME:VALUE), 10 s at most, reading at most 64 KiB
// of the answer.
func fetch(url string, headers []string) (int, []byte, error) {
	if url == "" {
		return 0, nil, errors.New("no url")
	}
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	for _, h := range headers {
		name, value, ok := strings.Cut(h, ":")
		if !ok {
			return 0, nil, fmt.Errorf("header %q: want NAME:VALUE", h)
		}
		req.Header.Add(name, value)
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return resp.StatusCode, b, err
}

// kubeVersion asks the API server for /version the way client-go's in-cluster config reaches it:
// https://KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT, the mounted CA and bearer token.
func kubeVersion() (int, []byte, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return 0, nil, errors.New("KUBERNETES_SERVICE_HOST or KUBERNETES_SERVICE_PORT not set")
	}
	ca, err := os.ReadFile(caPath)
	if err != nil {
		return 0, nil, err
	}
	token, err := os.ReadFile(tokenPath)
	if err != nil {
		return 0, nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return 0, nil, errors.New(caPath + ": no certificate")
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	req, err := http.NewRequest(http.MethodGet, "https://"+net.JoinHostPort(host, port)+"/version", nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+string(token))
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, b, err
}
