package cli

import (
	"encoding/json"
	"runtime"
	"runtime/debug"
	"testing"

	"go.yaml.in/yaml/v3"
)

// Without a version stamped at link time, the build info says which version this is: a go
// install of a tagged module, or the checkout's commit.
func TestVersionFallback(t *testing.T) {
	vcs := func(rev, modified string) []debug.BuildSetting {
		return []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}
	}
	for _, tc := range []struct {
		name    string
		stamped string
		info    *debug.BuildInfo
		want    versionInfo
	}{
		{"stamped", "v1.2.3", &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v0.9.0"}},
			versionInfo{Version: "v1.2.3", GoVersion: "go1.26.8"}},
		{"go install @version", "", &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v0.4.1"}},
			versionInfo{Version: "v0.4.1", GoVersion: "go1.26.8"}},
		{"checkout", "", &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}, Settings: vcs("0123456789abcdef0123", "false")},
			versionInfo{Version: "devel-0123456789ab", Revision: "0123456789abcdef0123", GoVersion: "go1.26.8"}},
		{"dirty checkout", "", &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}, Settings: vcs("0123456789abcdef0123", "true")},
			versionInfo{Version: "devel-0123456789ab-dirty", Revision: "0123456789abcdef0123", Modified: true, GoVersion: "go1.26.8"}},
		{"nothing known", "", &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}},
			versionInfo{Version: "dev", GoVersion: "go1.26.8"}},
		{"no build info", "", nil, versionInfo{Version: "dev", GoVersion: runtime.Version()}},
	} {
		tc.want.Platform = runtime.GOOS + "/" + runtime.GOARCH
		if got := buildVersion(tc.stamped, tc.info); got != tc.want {
			t.Errorf("%s: %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

func TestVersionOutputs(t *testing.T) {
	want := currentVersion()
	if code, out, errOut := run(t, "--version"); code != 0 || out != "detour "+want.Version+"\n" {
		t.Fatalf("--version: %d %q %q", code, out, errOut)
	}
	if code, out, errOut := run(t, "version"); code != 0 || out != "detour "+want.Version+"\n" {
		t.Fatalf("version: %d %q %q", code, out, errOut)
	}
	var got versionInfo
	code, out, errOut := run(t, "version", "-o", "json")
	if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || got != want {
		t.Fatalf("version -o json: %d %v %+v %q", code, err, got, errOut)
	}
	got = versionInfo{}
	code, out, errOut = run(t, "version", "-o", "yaml")
	if err := yaml.Unmarshal([]byte(out), &got); code != 0 || err != nil || got != want {
		t.Fatalf("version -o yaml: %d %v %+v %q", code, err, got, errOut)
	}
	if code, _, errOut := run(t, "version", "-o", "xml"); code != 1 || errOut != "detour: --output \"xml\": want json or yaml\n" {
		t.Fatalf("version -o xml: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, "version", "extra"); code != 1 || errOut != "detour: version takes no arguments, got 1 ([\"extra\"]); usage: detour version [-o json|yaml] [flags]\n" {
		t.Fatalf("version extra: %d %q", code, errOut)
	}
}
