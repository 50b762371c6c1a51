package testbed

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var podproc struct {
	once sync.Once
	path string
	err  error
}

// podprocBinary builds testbed/podproc once per test process (the Go build cache makes later
// builds instant).
func podprocBinary() (string, error) {
	podproc.once.Do(func() {
		dir, err := os.MkdirTemp("", "detour-podproc-")
		if err != nil {
			podproc.err = err
			return
		}
		podproc.path = filepath.Join(dir, "podproc")
		out, err := exec.Command("go", "build", "-o", podproc.path, "github.com/detour-mesh/detour/integration/testbed/podproc").CombinedOutput()
		if err != nil {
			podproc.err = fmt.Errorf("testbed: building podproc: %v\n%s", err, out)
		}
	})
	return podproc.path, podproc.err
}

// PodProc is the podproc binary (built once per test process), for tests that run Istio's HBONE
// server or an echo as a process of their own outside any pod, e.g. on a loopback address.
func PodProc() (string, error) { return podprocBinary() }

// Run starts podproc with args inside the pod's network namespace, waits until addr accepts
// connections (dialled from inside the pod), and stops it when the test ends.
func (p *Pod) Run(t testing.TB, addr string, args ...string) {
	t.Helper()
	p.RunAs(t, 0, addr, args...)
}

// RunAs is Run as user (and group) uid (setpriv), e.g. 1337 for a stand-in Istio sidecar. 0 runs
// as root.
func (p *Pod) RunAs(t testing.TB, uid int, addr string, args ...string) {
	t.Helper()
	bin, err := podprocBinary()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	argv := append([]string{"netns", "exec", p.netns}, bin)
	if uid != 0 {
		id := strconv.Itoa(uid)
		argv = []string{"netns", "exec", p.netns, "setpriv", "--reuid=" + id, "--regid=" + id, "--clear-groups", "--", bin}
	}
	pr, err := startProc(dir, "podproc-"+args[0], nil, "ip", append(argv, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		early := pr.exited() // a stand-in that died mid-test explains many failures
		pr.stop(5 * time.Second)
		if t.Failed() && early != nil {
			t.Logf("testbed: in pod %s, before the test ended: %v", p.Name, early)
		} else if t.Failed() {
			t.Logf("testbed: podproc %s in pod %s:\n%s", strings.Join(args, " "), p.Name, pr.tail())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if err := pr.exited(); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := p.DialContext(ctx, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("testbed: %s in pod %s never listened on %s: %v\n%s", args[0], p.Name, addr, err, pr.tail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// RunIstioHBONE runs Istio's own Go HBONE server on port 15008 of the pod with identity w,
// standing in for the pod's ztunnel inbound. Everything it dials stays inside the pod's namespace.
func (p *Pod) RunIstioHBONE(t testing.TB, w *Workload) {
	t.Helper()
	cert, key, bundle, err := w.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	addr := p.IP + ":15008"
	p.Run(t, addr, "istio-hbone", addr, cert, key, bundle)
}

// WriteFiles writes the workload's certificate chain, key and trust bundle as PEM files in dir
// (cert.pem, key.pem, bundle.pem): what a files identity source or Istio's server reads.
func (w *Workload) WriteFiles(dir string) (cert, key, bundle string, err error) {
	cert, key, bundle = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "bundle.pem")
	if err := writeSVID(w.SVID, cert, key); err != nil {
		return "", "", "", err
	}
	var roots []byte
	for _, c := range w.Bundle.X509Authorities() {
		roots = append(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return cert, key, bundle, os.WriteFile(bundle, roots, 0o600)
}

func writeSVID(s *x509svid.SVID, certPath, keyPath string) error {
	var chain []byte
	for _, c := range s.Certificates {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(s.PrivateKey)
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	if err := os.WriteFile(certPath, chain, 0o600); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	return os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}
