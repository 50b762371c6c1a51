package chart

import (
	"bytes"
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"sigs.k8s.io/yaml"

	"github.com/detour-mesh/detour/cmd/detour/cli"
	"github.com/detour-mesh/detour/mesh"
)

const dir = "../../" + mesh.ChartDir

// release is the version the tests play: a release's CLI and the chart packaged for it
// (helm package --app-version).
const release = "v9.9.9"

func load(t *testing.T) *chart.Chart {
	t.Helper()
	ch, err := loader.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	ch.Metadata.AppVersion = release
	return ch
}

// template is `helm template --include-crds -n ns` with vals: every object, CRDs first.
func template(t *testing.T, vals map[string]any, ns string) ([]map[string]any, error) {
	t.Helper()
	ch := load(t)
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: "detour", Namespace: ns, IsInstall: true}, chartutil.DefaultCapabilities)
	if err != nil {
		return nil, err
	}
	out, err := engine.Render(ch, rv)
	if err != nil {
		return nil, err
	}
	var docs []byte
	for _, crd := range ch.CRDObjects() {
		docs = append(append(docs, crd.File.Data...), "\n---\n"...)
	}
	names := make([]string, 0, len(out))
	for name := range out {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		docs = append(append(docs, out[name]...), "\n---\n"...)
	}
	return objects(t, docs), nil
}

// objects parses a multi-document YAML, skipping empty documents, sorted by kind and name.
func objects(t *testing.T, b []byte) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var m map[string]any
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			t.Fatalf("%v in\n%s", err, doc)
		}
		if len(m) > 0 {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(a, b map[string]any) int { return strings.Compare(key(a), key(b)) })
	return out
}

func key(m map[string]any) string {
	meta, _ := m["metadata"].(map[string]any)
	return fmt.Sprint(m["kind"], "/", meta["namespace"], "/", meta["name"])
}

// print is `detour install --print` of a release CLI.
func print(t *testing.T, args ...string) []map[string]any {
	t.Helper()
	saved := cli.Version
	cli.Version = release
	defer func() { cli.Version = saved }()
	var out, errOut bytes.Buffer
	if code := cli.Run(context.Background(), append([]string{"install", "--print"}, args...), &out, &errOut); code != 0 {
		t.Fatalf("install --print: %s", errOut.String())
	}
	return objects(t, out.Bytes())
}

func same(t *testing.T, got, want []map[string]any) {
	t.Helper()
	if len(got) != len(want) {
		var g, w []string
		for _, o := range got {
			g = append(g, key(o))
		}
		for _, o := range want {
			w = append(w, key(o))
		}
		t.Fatalf("helm template renders %v\ninstall --print prints %v", g, w)
	}
	for i := range got {
		if !reflect.DeepEqual(got[i], want[i]) {
			gb, _ := yaml.Marshal(got[i])
			wb, _ := yaml.Marshal(want[i])
			t.Errorf("%s differs:\nhelm template:\n%s\ninstall --print:\n%s", key(got[i]), gb, wb)
		}
	}
}

// For the same settings, `helm template` renders exactly the objects `detour install --print`
// prints (the order aside: Helm sorts by kind).
func TestTemplateIsInstallPrint(t *testing.T) {
	for _, tc := range []struct {
		name string
		vals map[string]any
		args []string
	}{
		{"defaults", nil, []string{"-n", "shop"}},
		{"image", map[string]any{"image": "registry.example/detour@sha256:0123"}, []string{"-n", "shop", "--image", "registry.example/detour@sha256:0123"}},
		{"everything", map[string]any{"name": "dbg", "replicas": 3, "podMonitor": true},
			[]string{"-n", "team-a", "--name", "dbg", "--replicas", "3", "--pod-monitor"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := tc.args[1]
			got, err := template(t, tc.vals, ns)
			if err != nil {
				t.Fatal(err)
			}
			same(t, got, print(t, tc.args...))
		})
	}
}

// Resources have no install flag: the chart's values against the Installer's.
func TestTemplateResources(t *testing.T) {
	r := mesh.Resources{RequestsCPU: "250m", RequestsMemory: "256Mi", LimitsCPU: "4", LimitsMemory: "1Gi"}
	got, err := template(t, map[string]any{"resources": map[string]any{
		"requests": map[string]any{"cpu": r.RequestsCPU, "memory": r.RequestsMemory},
		"limits":   map[string]any{"cpu": r.LimitsCPU, "memory": r.LimitsMemory}}}, "shop")
	if err != nil {
		t.Fatal(err)
	}
	in := &mesh.Installer{Namespace: "shop", Image: mesh.ReleaseImage(release), Version: release, Pod: mesh.PodOptions{Resources: r}}
	b, err := in.Manifests()
	if err != nil {
		t.Fatal(err)
	}
	same(t, got, objects(t, b))
}

// values.schema.json refuses what the chart does not know.
func TestValuesRefused(t *testing.T) {
	for _, vals := range []map[string]any{
		{"replica": 3},
		{"replicas": "3"},
		{"name": "Not_A_Name"},
		{"resources": map[string]any{"requests": map[string]any{"cpu": "1", "memory": "1Gi", "gpu": "1"}}},
	} {
		if _, err := template(t, vals, "shop"); err == nil || !strings.Contains(err.Error(), "values don't meet the specifications of the schema") {
			t.Errorf("values %v: %v", vals, err)
		}
	}
}

// `helm lint` finds nothing above INFO, with the default values and with every value set.
func TestLint(t *testing.T) {
	for _, vals := range []map[string]any{nil, {"name": "dbg", "image": "registry.example/detour:v1", "replicas": 1, "podMonitor": true}} {
		l := lint.AllWithKubeVersion(dir, vals, "shop", nil)
		for _, m := range l.Messages {
			if m.Severity > support.InfoSev {
				t.Errorf("helm lint %v: %s", vals, m)
			} else {
				t.Logf("helm lint: %s", m)
			}
		}
	}
}
