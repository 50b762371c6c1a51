package image

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// testOptions are what both tests build: TestImageArchive checks the archive, TestContainerd runs it.
var testOptions = Options{Source: "../..", Version: "v0.0.0-test", Revision: "0123abc", Created: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC),
	GoBuild: cachedGoBuild}

// built holds each platform's binary once built: cross-building cmd/detour takes minutes on a
// busy machine, so the package's tests (and TestImageArchive's second Build) share one build. Go's
// own build is reproducible with -trimpath and no VCS stamp; the tests are about what Build adds
// (and the checkout may change under a long cross-build).
var built struct {
	sync.Mutex
	bins map[string][]byte // by the build's environment
}

func cachedGoBuild(ctx context.Context, dir string, env []string, args ...string) error {
	built.Lock()
	defer built.Unlock()
	key, out := strings.Join(env, " "), args[slices.Index(args, "-o")+1]
	if b, ok := built.bins[key]; ok {
		return os.WriteFile(out, b, 0o755)
	}
	if err := goBuild(ctx, dir, env, args...); err != nil {
		return err
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return err
	}
	if built.bins == nil {
		built.bins = map[string][]byte{}
	}
	built.bins[key] = b
	return nil
}

// archive builds the image from this checkout and writes its archive.
func archive(t *testing.T, o Options) ([]byte, v1.Hash) {
	t.Helper()
	// Cross-building cmd/detour twice from a cold cache takes minutes on a busy machine: the
	// test's own deadline bounds it.
	ctx := context.Background()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d)
		defer cancel()
	}
	idx, err := Build(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteArchive(&buf, idx, Ref(o.Version), o.Created); err != nil {
		t.Fatal(err)
	}
	d, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), d
}

// shared is testOptions' archive, built by the first test that needs it.
var shared struct {
	sync.Mutex
	b []byte
	d v1.Hash
}

// sharedArchive is testOptions' archive, built once per test process.
func sharedArchive(t *testing.T) ([]byte, v1.Hash) {
	t.Helper()
	shared.Lock()
	defer shared.Unlock()
	if shared.b == nil {
		shared.b, shared.d = archive(t, testOptions)
	}
	return shared.b, shared.d
}

// untar extracts an archive (regular files and directories only) into a new directory.
func untar(t *testing.T, b []byte) string {
	t.Helper()
	dir := t.TempDir()
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return dir
		}
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(path, dir+string(filepath.Separator)) {
			t.Fatalf("archive entry %q escapes", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(path, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			body, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, body, 0o755); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("archive entry %q has type %c", h.Name, h.Typeflag)
		}
	}
}

// files reads a layer's entries: name -> header and body.
func files(t *testing.T, l v1.Layer) map[string]*tar.Header {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = h
		if h.Typeflag == tar.TypeReg {
			body, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			h.PAXRecords = map[string]string{"body": string(body)} // kept for the test's reads
		}
	}
}

// The archive is an OCI layout that go-containerregistry reads back: one index named for the
// version, two platforms, each with the entrypoint, the nonroot user, the labels and a static
// binary for its architecture; built twice, it is the same bytes.
func TestImageArchive(t *testing.T) {
	o := testOptions
	b, digest := sharedArchive(t)
	dir := untar(t, b)
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	top, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	tm, err := top.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(tm.Manifests) != 1 || tm.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "ghcr.io/detour-mesh/detour:v0.0.0-test" ||
		tm.Manifests[0].Digest != digest || tm.Manifests[0].MediaType != types.OCIImageIndex {
		t.Fatalf("index.json: %+v, want one OCI index %s named ghcr.io/detour-mesh/detour:v0.0.0-test", tm.Manifests, digest)
	}
	idx, err := top.ImageIndex(digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if im.Annotations["org.opencontainers.image.version"] != "v0.0.0-test" {
		t.Errorf("index annotations: %v", im.Annotations)
	}
	var platforms []string
	for _, m := range im.Manifests {
		platforms = append(platforms, m.Platform.String())
		img, err := idx.Image(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		checkImage(t, img, *m.Platform, o)
	}
	if want := []string{"linux/amd64", "linux/arm64"}; !slices.Equal(platforms, want) {
		t.Errorf("platforms %v, want %v", platforms, want)
	}

	// Reproducible: the same source, version and time give the same bytes.
	again, digest2 := archive(t, o)
	if digest2 != digest || sha256.Sum256(again) != sha256.Sum256(b) {
		t.Errorf("built twice: index %s then %s, archive sha256 %x then %x", digest, digest2, sha256.Sum256(b), sha256.Sum256(again))
	}
}

func checkImage(t *testing.T, img v1.Image, p v1.Platform, o Options) {
	t.Helper()
	mt, _ := img.MediaType()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if mt != types.OCIManifestSchema1 || cf.OS != p.OS || cf.Architecture != p.Architecture {
		t.Errorf("%s: media type %s, config for %s/%s", p, mt, cf.OS, cf.Architecture)
	}
	if !slices.Equal(c.Entrypoint, []string{"/usr/local/bin/detour"}) || c.User != "65532:65532" || len(c.Cmd) != 0 {
		t.Errorf("%s: entrypoint %v, cmd %v, user %q", p, c.Entrypoint, c.Cmd, c.User)
	}
	for k, v := range map[string]string{
		"org.opencontainers.image.version":  "v0.0.0-test",
		"org.opencontainers.image.revision": "0123abc",
		"org.opencontainers.image.source":   "https://github.com/detour-mesh/detour",
		"org.opencontainers.image.created":  "2026-12-01T00:00:00Z",
	} {
		if c.Labels[k] != v {
			t.Errorf("%s: label %s = %q, want %q", p, k, c.Labels[k], v)
		}
	}
	if !cf.Created.Time.Equal(o.Created) {
		t.Errorf("%s: created %v", p, cf.Created)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 2 {
		t.Fatalf("%s: layers %d %v", p, len(layers), err)
	}
	all := files(t, layers[0])
	for k, v := range files(t, layers[1]) {
		all[k] = v
	}
	if pw := all["etc/passwd"]; pw == nil || !strings.Contains(pw.PAXRecords["body"], "nonroot:x:65532:65532:") {
		t.Errorf("%s: /etc/passwd names no nonroot 65532", p)
	}
	for name, h := range all {
		if !h.ModTime.Equal(o.Created) {
			t.Errorf("%s: %s has time %v", p, name, h.ModTime)
		}
	}
	bin := all["usr/local/bin/detour"]
	if bin == nil || bin.Mode != 0o755 {
		t.Fatalf("%s: no executable /usr/local/bin/detour", p)
	}
	checkBinary(t, p, []byte(bin.PAXRecords["body"]))
}

// checkBinary: an ELF for the platform's machine, static (no interpreter), and, on this
// machine's own architecture, one that runs and says its version.
func checkBinary(t *testing.T, p v1.Platform, b []byte) {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	want := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}[p.Architecture]
	if f.Machine != want {
		t.Errorf("%s: ELF machine %v", p, f.Machine)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Errorf("%s: the binary is dynamically linked", p)
		}
	}
	if p.Architecture != runtime.GOARCH || runtime.GOOS != "linux" {
		return
	}
	path := filepath.Join(t.TempDir(), "detour")
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(path, "version").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "detour v0.0.0-test" {
		t.Errorf("%s: detour version: %q %v", p, out, err)
	}
}
