package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNonLinuxLinksNoNetfilter: the laptop builds of detour link none of the Linux-only packages
// (netfilter, conntrack, netlink, iptables) that only the in-pod agent needs.
func TestNonLinuxLinksNoNetfilter(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	linuxOnly := []string{"github.com/ti-mo/netfilter", "github.com/ti-mo/conntrack", "github.com/mdlayher/netlink", "github.com/coreos/go-iptables"}
	for _, goos := range []string{"darwin", "windows"} {
		cmd := exec.Command("go", "list", "-deps", ".")
		cmd.Env = append(cmd.Environ(), "GOOS="+goos, "GOARCH=amd64", "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("GOOS=%s go list -deps: %v\n%s", goos, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			for _, bad := range linuxOnly {
				if dep == bad || strings.HasPrefix(dep, bad+"/") {
					t.Errorf("GOOS=%s: cmd/detour links %s", goos, dep)
				}
			}
		}
	}
}

// TestVersionStamped: `make release` stamps the version with -ldflags -X (as its recipe does, with
// -trimpath), and `detour --version` and `detour version -o json` print it.
func TestVersionStamped(t *testing.T) {
	if testing.Short() {
		t.Skip("builds detour")
	}
	bin := t.TempDir() + "/detour"
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-X github.com/detour-mesh/detour/cmd/detour/cli.Version=v9.8.7-test", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, args := range [][]string{{"--version"}, {"version", "-o", "json"}} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "v9.8.7-test") {
			t.Errorf("detour %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
