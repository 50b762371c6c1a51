// Command podapp is the program of the test bed node's two local images (no registry is reachable,
// so they are built here, see image.NodeImages):
//
//	podapp pause          the pod sandbox's process: waits for SIGTERM or SIGINT, reaps orphans
//	podapp serve ADDR     a test app: GET / answers the pod's hostname, GET /token the pod's
//	                      ServiceAccount token as mounted by the kubelet
//
// It uses the standard library only, so that it builds static and small.
package main

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
)

// tokenPath is where the kubelet mounts a pod's ServiceAccount token (the projected
// kube-api-access volume the ServiceAccount admission plugin adds).
const tokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"

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
	}
	return errors.New("usage: podapp pause | podapp serve ADDR")
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
	return http.ListenAndServe(addr, mux)
}
