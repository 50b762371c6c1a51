package arch

import (
	"fmt"
	"os/exec"
	"path"
	"strings"
	"testing"
)

const module = "github.com/detour-mesh/detour/"

// rule says which packages (by path inside the module, "x/..." for a tree) must not import which
// (module paths, "x/..." for a tree, or a Kubernetes client prefix), and why.
type rule struct {
	from []string
	not  []string
	why  string
}

// kube stands for every Kubernetes client library (see kubernetes).
const kube = "kubernetes client code"

// layers is ARCHITECTURE.md's layering as data: the wire and identity at the bottom, the proxy
// above them, Kubernetes only in mesh, and cmd a thin layer on top.
var layers = []rule{
	{from: []string{"hbone/...", "identity/..."}, not: []string{"proxy/...", "mesh/...", "agent/...", "egress/...", "cmd/..."},
		why: "hbone and identity sit below everything else"},
	{from: []string{"hbone/...", "identity/...", "proxy/..."}, not: []string{kube, "mesh/...", "cmd/..."},
		why: "the data path never depends on Kubernetes: that is mesh's job"},
	{from: []string{"agent/..."}, not: []string{"proxy/...", "mesh/...", "egress/...", "cmd/..."},
		why: "the agent is rules and conntrack only; the sidecar's data path is proxy/sidecar"},
	{from: []string{"egress/..."}, not: []string{"proxy/...", "mesh/...", "agent/...", "cmd/..."},
		why: "egress speaks HBONE through the tunnel, nothing more"},
	{from: []string{"mesh/..."}, not: []string{"cmd/...", "agent/..."},
		why: "mesh is a library for cmd"},
	{from: []string{"cmd/..."}, not: []string{kubeDirect},
		why: "cmd reaches Kubernetes only through mesh"},
}

// kubeDirect stands for a direct import of Kubernetes client code (mesh's, indirectly, is fine).
const kubeDirect = "kubernetes client code, imported directly"

// matches reports whether the module-relative path p is named by pattern ("x/..." for a tree).
func matches(pattern, p string) bool {
	if tree, ok := strings.CutSuffix(pattern, "/..."); ok {
		return p == tree || strings.HasPrefix(p, tree+"/")
	}
	return p == pattern
}

// violations lists the imports of pkg (a module-relative path; deps are full import paths, direct
// and indirect) that break a rule.
func violations(rules []rule, pkg string, imports, deps []string) []string {
	var out []string
	for _, r := range rules {
		if !anyMatch(r.from, pkg) {
			continue
		}
		for _, not := range r.not {
			if not == kubeDirect {
				for _, imp := range imports {
					if kubernetes(imp) {
						out = append(out, fmt.Sprintf("%s imports %s (%s)", pkg, imp, r.why))
					}
				}
				continue
			}
			if not == kube {
				for _, d := range deps {
					if kubernetes(d) {
						out = append(out, fmt.Sprintf("%s imports %s (%s)", pkg, d, r.why))
						break
					}
				}
				continue
			}
			for _, imp := range imports {
				if rel, ok := strings.CutPrefix(imp, module); ok && matches(not, rel) {
					out = append(out, fmt.Sprintf("%s imports %s (%s)", pkg, rel, r.why))
				}
			}
		}
	}
	return out
}

func anyMatch(patterns []string, p string) bool {
	for _, pat := range patterns {
		if matches(pat, p) {
			return true
		}
	}
	return false
}

// goList returns the direct imports and all dependencies of the package in dir.
func goList(t *testing.T, dir string) (importPath string, imports, deps []string) {
	t.Helper()
	out, err := exec.Command("go", "list", "-f", "{{.ImportPath}}\n{{join .Imports \" \"}}\n{{join .Deps \" \"}}", dir).Output()
	if err != nil {
		t.Fatalf("go list %s: %v", dir, err)
	}
	lines := strings.Split(string(out), "\n")
	return lines[0], strings.Fields(lines[1]), strings.Fields(lines[2])
}

func TestLayers(t *testing.T) {
	for _, p := range list(t, "../...") {
		rel, ok := strings.CutPrefix(p.ImportPath, module)
		if !ok {
			continue
		}
		_, imports, deps := goList(t, p.ImportPath)
		for _, v := range violations(layers, rel, imports, deps) {
			t.Error(v)
		}
	}
}

// Each rule catches a deliberate violation: a fixture package under testdata/violate imports
// what the rule forbids, and is checked as if it lived where the rule applies.
func TestLayersCatchViolations(t *testing.T) {
	for _, tc := range []struct {
		fixture, as, want string
	}{
		{"hbone_imports_proxy", "hbone/fixture", "hbone/fixture imports proxy/route (hbone and identity sit below everything else)"},
		{"proxy_imports_mesh", "proxy/fixture", "proxy/fixture imports mesh (the data path never depends on Kubernetes: that is mesh's job)"},
		{"proxy_imports_kube", "proxy/fixture", "proxy/fixture imports k8s.io/"},
		{"agent_imports_proxy", "agent/fixture", "agent/fixture imports proxy/session (the agent is rules and conntrack only; the sidecar's data path is proxy/sidecar)"},
		{"egress_imports_proxy", "egress/fixture", "egress/fixture imports proxy/tunnel (egress speaks HBONE through the tunnel, nothing more)"},
		{"mesh_imports_cmd", "mesh/fixture", "mesh/fixture imports cmd/detour/cli (mesh is a library for cmd)"},
		{"cmd_imports_kube", "cmd/fixture", "cmd/fixture imports k8s.io/client-go/kubernetes (cmd reaches Kubernetes only through mesh)"},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			_, imports, deps := goList(t, "./"+path.Join("testdata/violate", tc.fixture))
			got := strings.Join(violations(layers, tc.as, imports, deps), "\n")
			if !strings.Contains(got, tc.want) {
				t.Errorf("violations:\n%s\nwant one containing %q", got, tc.want)
			}
		})
	}
}
