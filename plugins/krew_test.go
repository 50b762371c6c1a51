package plugins

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// plugin is shaped like krew's index.Plugin (sigs.k8s.io/krew v0.4.3, pkg/index/types.go); the
// strict decode refuses a field krew does not know.
type plugin struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Spec struct {
		Version          string     `json:"version"`
		ShortDescription string     `json:"shortDescription"`
		Description      string     `json:"description"`
		Caveats          string     `json:"caveats"`
		Homepage         string     `json:"homepage"`
		Platforms        []platform `json:"platforms"`
	} `json:"spec"`
}

type platform struct {
	URI      string `json:"uri"`
	Sha256   string `json:"sha256"`
	Selector struct {
		MatchLabels map[string]string `json:"matchLabels"`
	} `json:"selector"`
	Files []struct {
		From string `json:"from"`
		To   string `json:"to"`
	} `json:"files"`
	Bin string `json:"bin"`
}

var (
	semver = regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$`)
	sha256 = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// validate follows krew's ValidatePlugin and validatePlatform (sigs.k8s.io/krew v0.4.3,
// internal/index/validation/validate.go), and detour's archive names.
func validate(p plugin, version string) []string {
	var errs []string
	bad := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }
	if p.APIVersion != "krew.googlecontainertools.github.com/v1alpha2" || p.Kind != "Plugin" || p.Metadata.Name != "detour" {
		bad("apiVersion %q kind %q name %q", p.APIVersion, p.Kind, p.Metadata.Name)
	}
	if s := p.Spec.ShortDescription; s == "" || strings.ContainsAny(s, "\r\n") {
		bad("shortDescription %q", s)
	}
	if p.Spec.Version != version || !semver.MatchString(p.Spec.Version) {
		bad("version %q, want %q", p.Spec.Version, version)
	}
	var seen []string
	for _, pl := range p.Spec.Platforms {
		os, arch := pl.Selector.MatchLabels["os"], pl.Selector.MatchLabels["arch"]
		seen = append(seen, os+"/"+arch)
		ext, bin := "tar.gz", "detour"
		if os == "windows" {
			ext, bin = "zip", "detour.exe"
		}
		archive := fmt.Sprintf("detour_%s_%s_%s.%s", version, os, arch, ext)
		if pl.URI != "https://github.com/detour-mesh/detour/releases/download/"+version+"/"+archive {
			bad("%s/%s: uri %q, want the release's %s", os, arch, pl.URI, archive)
		}
		if !sha256.MatchString(pl.Sha256) {
			bad("%s/%s: sha256 %q", os, arch, pl.Sha256)
		}
		if pl.Bin != bin {
			bad("%s/%s: bin %q, want %q", os, arch, pl.Bin, bin)
		}
	}
	if want := []string{"linux/amd64", "linux/arm64", "darwin/amd64", "darwin/arm64", "windows/amd64"}; !slices.Equal(seen, want) {
		bad("platforms %v, want %v", seen, want)
	}
	return errs
}

// krew.sh fills the manifest from a release's SHA256SUMS into one krew accepts.
func TestManifest(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh:", err)
	}
	const version = "v1.2.3"
	var sums strings.Builder
	for i, p := range []string{"linux_amd64.tar.gz", "linux_arm64.tar.gz", "darwin_amd64.tar.gz", "darwin_arm64.tar.gz", "windows_amd64.zip"} {
		fmt.Fprintf(&sums, "%s  detour_%s_%s\n", strings.Repeat(fmt.Sprint(i), 64), version, p)
	}
	file := filepath.Join(t.TempDir(), "SHA256SUMS")
	if err := os.WriteFile(file, []byte(sums.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sh, "krew.sh", version, file).Output()
	if err != nil {
		t.Fatalf("krew.sh: %v", err)
	}
	var p plugin
	if err := yaml.UnmarshalStrict(out, &p); err != nil {
		t.Fatalf("strict decode: %v\n%s", err, out)
	}
	for _, e := range validate(p, version) {
		t.Error(e)
	}
	if p.Spec.Platforms[4].Sha256 != strings.Repeat("4", 64) {
		t.Errorf("windows sha256 %q: not the one of its archive", p.Spec.Platforms[4].Sha256)
	}

	// A missing checksum is refused, not left as a placeholder.
	if err := os.WriteFile(file, []byte(strings.Join(strings.SplitN(sums.String(), "\n", 2)[:1], "")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(sh, "krew.sh", version, file).CombinedOutput(); err == nil || !strings.Contains(string(out), "no checksum for detour_v1.2.3_linux_arm64.tar.gz") {
		t.Errorf("krew.sh with one checksum: %v %s", err, out)
	}
}
