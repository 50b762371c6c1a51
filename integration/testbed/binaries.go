package testbed

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Versions the test bed builds. IstioVersion is the istio.io/istio version in integration/go.mod;
// GatewayAPIVersion is the one that Istio version depends on.
const (
	KubernetesVersion = "v1.37.2"
	StagingVersion    = "v0.37.2"
	IstioVersion      = "v0.0.0-20260827124520-eed52ebb66ad"
	GatewayAPIVersion = "v1.6.0"
)

// Binaries are the control-plane programs a Cluster runs.
type Binaries struct {
	Etcd          string
	KubeAPIServer string
	Istiod        string
}

// CacheDir is where built binaries are kept: $DETOUR_TESTBED_CACHE, else
// $XDG_CACHE_HOME/detour-testbed, else ~/.cache/detour-testbed.
func CacheDir() (string, error) {
	if d := os.Getenv("DETOUR_TESTBED_CACHE"); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("testbed: finding a cache directory: %w", err)
	}
	return filepath.Join(d, "detour-testbed"), nil
}

// EnsureBinaries returns the control-plane binaries, building kube-apiserver and istiod from the
// Go module proxy the first time a version is asked for (minutes), and reusing them after
// (instant). Concurrent callers, in this process or another, wait for one build. logf reports
// each phase and how long it took.
func EnsureBinaries(ctx context.Context, logf func(format string, args ...any)) (Binaries, error) {
	return ensureBinaries(ctx, logf, true)
}

// ensureBinaries is EnsureBinaries, istiod only when asked for.
func ensureBinaries(ctx context.Context, logf func(format string, args ...any), istiod bool) (Binaries, error) {
	var b Binaries
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		return b, errors.New("testbed: etcd not found on PATH: install Debian's etcd-server (apt-get install etcd-server)")
	}
	b.Etcd = etcd
	dir, err := CacheDir()
	if err != nil {
		return b, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return b, fmt.Errorf("testbed: creating %s: %w", dir, err)
	}
	b.KubeAPIServer, err = ensure(ctx, logf, dir, "kube-apiserver-"+KubernetesVersion, kubeAPIServerModule, "k8s.io/kubernetes/cmd/kube-apiserver")
	if err != nil || !istiod {
		return b, err
	}
	b.Istiod, err = ensure(ctx, logf, dir, "pilot-discovery-"+IstioVersion, istiodModule, "istio.io/istio/pilot/cmd/pilot-discovery")
	return b, err
}

// ensure builds pkg into dir/name unless it is there, in a scratch module whose go.mod is made by
// gomod. A lock per name makes concurrent callers (in this process or another) wait for one
// build, while builds of other binaries go on.
func ensure(ctx context.Context, logf func(string, ...any), dir, name string, gomod func(context.Context, string) (string, error), pkg string) (string, error) {
	out := filepath.Join(dir, name)
	if _, err := os.Stat(out); err == nil {
		logf("testbed: using cached %s", out)
		return out, nil
	}
	unlock, err := lockFile(filepath.Join(dir, name+".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(out); err == nil { // built while this caller waited
		logf("testbed: using cached %s", out)
		return out, nil
	}
	start := time.Now()
	logf("testbed: building %s (first run only, a few minutes)", name)
	work, err := os.MkdirTemp(dir, "build-"+name+"-")
	if err != nil {
		return "", fmt.Errorf("testbed: %w", err)
	}
	defer os.RemoveAll(work)
	mod, err := gomod(ctx, work)
	if err != nil {
		return "", err
	}
	files := map[string]string{
		"go.mod":   mod,
		"tools.go": fmt.Sprintf("//go:build tools\n\npackage build\n\nimport _ %q\n", pkg),
	}
	for f, content := range files {
		if err := os.WriteFile(filepath.Join(work, f), []byte(content), 0o644); err != nil {
			return "", fmt.Errorf("testbed: %w", err)
		}
	}
	if err := goCmd(ctx, work, "mod", "tidy"); err != nil {
		return "", err
	}
	tmp := out + ".tmp"
	if err := goCmd(ctx, work, "build", "-trimpath", "-o", tmp, pkg); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", fmt.Errorf("testbed: %w", err)
	}
	logf("testbed: built %s in %v", name, time.Since(start).Round(time.Second))
	return out, nil
}

// kubeAPIServerModule requires k8s.io/kubernetes and maps each of its staging modules, which its
// go.mod replaces with ./staging/... paths, to the released version.
func kubeAPIServerModule(ctx context.Context, work string) (string, error) {
	info, err := download(ctx, work, "k8s.io/kubernetes@"+KubernetesVersion)
	if err != nil {
		return "", err
	}
	raw, err := os.ReadFile(info.GoMod)
	if err != nil {
		return "", fmt.Errorf("testbed: reading k8s.io/kubernetes go.mod: %w", err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "module build\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n", KubernetesVersion)
	n := 0
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[1] == "=>" && strings.HasPrefix(f[2], "./staging/") {
			fmt.Fprintf(&b, "\t%s => %s %s\n", f[0], f[0], StagingVersion)
			n++
		}
	}
	if n == 0 {
		return "", errors.New("testbed: k8s.io/kubernetes go.mod has no staging replace lines")
	}
	b.WriteString(")\n")
	return b.String(), nil
}

func istiodModule(context.Context, string) (string, error) {
	return fmt.Sprintf("module build\n\ngo 1.26\n\nrequire istio.io/istio %s\n", IstioVersion), nil
}

type modInfo struct {
	Dir, GoMod, Error string
}

// download fetches a module@version through the Go module proxy and says where it is.
func download(ctx context.Context, work, modVersion string) (modInfo, error) {
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", modVersion)
	cmd.Dir = work
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	var info modInfo
	if jerr := json.Unmarshal(out.Bytes(), &info); jerr != nil || err != nil || info.Error != "" {
		return info, fmt.Errorf("testbed: go mod download %s: %v %s %s", modVersion, err, info.Error, tail(out.String()))
	}
	return info, nil
}

// ModuleDir returns the source directory of module@version (downloading it if needed), e.g. to
// read CRDs shipped in it.
func ModuleDir(ctx context.Context, modVersion string) (string, error) {
	info, err := download(ctx, os.TempDir(), modVersion)
	return info.Dir, err
}

func goCmd(ctx context.Context, dir string, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("testbed: go %s in %s: %w\n%s", strings.Join(args, " "), dir, err, tail(string(out)))
	}
	return nil
}

func tail(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// lockFile takes an exclusive flock on path, waiting for other holders.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("testbed: locking %s: %w", path, err)
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// PilotAgent returns Istio's pilot-agent, built like istiod (cached per version): its
// `istio-iptables` subcommand (tools/istio-iptables) writes a sidecar pod's rules.
func PilotAgent(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	dir, err := CacheDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("testbed: creating %s: %w", dir, err)
	}
	return ensure(ctx, logf, dir, "pilot-agent-"+IstioVersion, istiodModule, "istio.io/istio/pilot/cmd/pilot-agent")
}

// NodeBinaries are the programs a Node runs besides containerd, runc and the CNI plugins
// (Debian's): the kubelet and kube-proxy, and the controller-manager and scheduler the node needs
// to run Deployments, ServiceAccounts and EndpointSlices.
type NodeBinaries struct {
	Kubelet, ControllerManager, Scheduler, Proxy string
	// IstioCNI is Istio CNI's plugin (IstioCNI), "" unless the node is ambient.
	IstioCNI string
}

// EnsureNodeBinaries returns the node's Kubernetes binaries, built like kube-apiserver from
// k8s.io/kubernetes at KubernetesVersion (each in a scratch module, sharing the Go build cache
// with kube-apiserver's build, so each takes minutes the first time and is instant after).
func EnsureNodeBinaries(ctx context.Context, logf func(format string, args ...any)) (NodeBinaries, error) {
	var b NodeBinaries
	dir, err := CacheDir()
	if err != nil {
		return b, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return b, fmt.Errorf("testbed: creating %s: %w", dir, err)
	}
	for _, x := range []struct {
		path *string
		cmd  string
	}{{&b.Kubelet, "kubelet"}, {&b.ControllerManager, "kube-controller-manager"}, {&b.Scheduler, "kube-scheduler"}, {&b.Proxy, "kube-proxy"}} {
		*x.path, err = ensure(ctx, logf, dir, x.cmd+"-"+KubernetesVersion, kubeAPIServerModule, "k8s.io/kubernetes/cmd/"+x.cmd)
		if err != nil {
			return b, err
		}
	}
	return b, nil
}

// IstioCNI returns Istio CNI's plugin (cni/cmd/istio-cni), built like istiod (cached per
// version): the node's chained CNI plugin with NodeOptions.Ambient.
func IstioCNI(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	dir, err := CacheDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("testbed: creating %s: %w", dir, err)
	}
	return ensure(ctx, logf, dir, "istio-cni-"+IstioVersion, istiodModule, "istio.io/istio/cni/cmd/istio-cni")
}
