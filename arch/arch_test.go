package arch

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

type pkg struct {
	ImportPath string
	Doc        string
	Name       string
	Deps       []string
	GoFiles    []string
}

func list(t *testing.T, patterns ...string) []pkg {
	t.Helper()
	out, err := exec.Command("go", append([]string{"list", "-json", "-deps=false"}, patterns...)...).Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// kubernetes reports Kubernetes client code. sigs.k8s.io/yaml is a plain YAML library (the config
// document uses it) and stays allowed.
func kubernetes(dep string) bool {
	for _, p := range []string{"k8s.io/", "sigs.k8s.io/controller-runtime", "sigs.k8s.io/gateway-api", "istio.io/client-go"} {
		if strings.HasPrefix(dep, p) {
			return true
		}
	}
	return false
}

// Every package says what it is, once.
func TestEveryPackageHasADocComment(t *testing.T) {
	for _, p := range list(t, "../...") {
		if p.Doc == "" {
			t.Errorf("%s has no package comment", p.ImportPath)
		}
	}
}
