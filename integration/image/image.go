// Package image builds detour's container image without Docker: the detour binary cross-built
// for each platform (static, -trimpath), on a distroless-style base of two files (/etc/passwd and
// /etc/group naming the nonroot user 65532) and two directories, as a multi-platform OCI index,
// written as an OCI image-layout tar. Every timestamp is Options.Created and every tar header is
// fixed, so the same source gives the same bytes. It lives in the integration module so that
// go-containerregistry stays out of detour's go.mod (the detour binary never needs it).
//
// No CA bundle is included: every TLS peer of the waypoint (istiod's CA, ztunnel, other
// replicas, the developer's tunnel) is verified against the mesh's root from the
// istio-ca-root-cert ConfigMap, never against public roots.
//
// It also builds the test bed node's images (node.go): a pause image, a test app image and
// Istio's echo app, each one platform, for `ctr images import`.
package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Repository is where releases are pushed; Ref(version) is the image `detour install` of that
// version uses by default.
const Repository = "ghcr.io/detour-mesh/detour"

// Entrypoint is the binary's path in the image.
const Entrypoint = "/usr/local/bin/detour"

// User is the image's user: distroless's nonroot (uid and gid 65532).
const User = "65532:65532"

// Platforms are what a release image holds.
var Platforms = []v1.Platform{{OS: "linux", Architecture: "amd64"}, {OS: "linux", Architecture: "arm64"}}

// Options say what to build. Created is every timestamp in the image (layers, config, history,
// the archive): the commit time makes the build reproducible.
type Options struct {
	Source    string // the detour module's root directory
	Version   string // set as cli.Version and in the labels; required
	Revision  string // the commit, in the labels ("" leaves the label out)
	Created   time.Time
	Platforms []v1.Platform // default Platforms
	// GoBuild runs `go build` (default: the go on PATH); a test may count or cache builds.
	GoBuild func(ctx context.Context, dir string, env []string, args ...string) error
}

// Ref is the image reference of a detour version.
func Ref(version string) string { return Repository + ":" + version }

// Labels are the image's org.opencontainers.image.* labels (also the index's annotations).
func (o *Options) Labels() map[string]string {
	l := map[string]string{
		"org.opencontainers.image.title":       "detour",
		"org.opencontainers.image.description": "Istio-native, HBONE-aware waypoint: steal or mirror live mesh traffic to a laptop",
		"org.opencontainers.image.source":      "https://github.com/detour-mesh/detour",
		"org.opencontainers.image.url":         "https://github.com/detour-mesh/detour",
		"org.opencontainers.image.version":     o.Version,
		"org.opencontainers.image.created":     o.Created.UTC().Format(time.RFC3339),
	}
	if o.Revision != "" {
		l["org.opencontainers.image.revision"] = o.Revision
	}
	return l
}

// Build cross-builds detour for every platform and assembles the index.
func Build(ctx context.Context, o Options) (v1.ImageIndex, error) {
	if o.Version == "" || o.Source == "" {
		return nil, errors.New("image: Options.Version and Options.Source are required")
	}
	platforms := o.Platforms
	if len(platforms) == 0 {
		platforms = Platforms
	}
	base, err := layer(baseFiles(), o.Created)
	if err != nil {
		return nil, err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range platforms {
		bin, err := o.binary(ctx, p)
		if err != nil {
			return nil, err
		}
		img, err := o.image(p, base, bin)
		if err != nil {
			return nil, err
		}
		plat := p
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &plat}})
	}
	return mutate.Annotations(idx, o.Labels()).(v1.ImageIndex), nil
}

// image is one platform's image: the base layer, the binary's layer, and the config.
func (o *Options) image(p v1.Platform, base v1.Layer, bin []byte) (v1.Image, error) {
	binLayer, err := layer([]file{{name: "usr/", mode: 0o755 | fs.ModeDir}, {name: "usr/local/", mode: 0o755 | fs.ModeDir},
		{name: "usr/local/bin/", mode: 0o755 | fs.ModeDir}, {name: strings.TrimPrefix(Entrypoint, "/"), mode: 0o755, body: bin}}, o.Created)
	if err != nil {
		return nil, err
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	created := v1.Time{Time: o.Created}
	img, err = mutate.Append(img,
		mutate.Addendum{Layer: base, History: v1.History{Created: created, CreatedBy: "detour image: /etc/passwd, /etc/group, /tmp, /home/nonroot"}},
		mutate.Addendum{Layer: binLayer, History: v1.History{Created: created, CreatedBy: "detour image: " + Entrypoint + " " + o.Version}})
	if err != nil {
		return nil, fmt.Errorf("image: %s/%s: %w", p.OS, p.Architecture, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %s/%s: %w", p.OS, p.Architecture, err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant, cf.Created = p.OS, p.Architecture, p.Variant, created
	cf.Config = v1.Config{
		Entrypoint: []string{Entrypoint},
		User:       User,
		WorkingDir: "/home/nonroot",
		Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/home/nonroot"},
		Labels:     o.Labels(),
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("image: %s/%s: %w", p.OS, p.Architecture, err)
	}
	return img, nil
}

// binary cross-builds cmd/detour: static (CGO_ENABLED=0), -trimpath, no VCS stamp, stripped, so
// the same source gives the same bytes.
func (o *Options) binary(ctx context.Context, p v1.Platform) ([]byte, error) {
	dir, err := os.MkdirTemp("", "detour-image-")
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "detour")
	env := []string{"CGO_ENABLED=0", "GOOS=" + p.OS, "GOARCH=" + p.Architecture, "GOFLAGS=-buildvcs=false"}
	if p.Variant != "" && p.Architecture == "arm" {
		env = append(env, "GOARM="+strings.TrimPrefix(p.Variant, "v"))
	}
	build := o.GoBuild
	if build == nil {
		build = goBuild
	}
	if err := build(ctx, o.Source, env, "-trimpath", "-ldflags",
		"-s -w -buildid= -X github.com/detour-mesh/detour/cmd/detour/cli.Version="+o.Version, "-o", out, "./cmd/detour"); err != nil {
		return nil, fmt.Errorf("image: building detour for %s/%s: %w", p.OS, p.Architecture, err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return b, nil
}

func goBuild(ctx context.Context, dir string, env []string, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", append([]string{"build"}, args...)...)
	cmd.Dir, cmd.Env = dir, append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// file is one tar entry; a directory's name ends in "/".
type file struct {
	name string
	mode fs.FileMode
	uid  int
	body []byte
}

// baseFiles are the distroless-style base: the nonroot user and group, a home and /tmp.
func baseFiles() []file {
	return []file{
		{name: "etc/", mode: 0o755 | fs.ModeDir},
		{name: "etc/group", mode: 0o644, body: []byte("root:x:0:\nnonroot:x:65532:\n")},
		{name: "etc/passwd", mode: 0o644, body: []byte("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")},
		{name: "home/", mode: 0o755 | fs.ModeDir},
		{name: "home/nonroot/", mode: 0o700 | fs.ModeDir, uid: 65532},
		{name: "tmp/", mode: 0o777 | fs.ModeDir | fs.ModeSticky},
	}
}

// layer is a gzipped tar of files, every header fixed (owner, time, format).
func layer(files []file, created time.Time) (v1.Layer, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if err := writeTar(zw, files, created); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return l, nil
}

func writeTar(w io.Writer, files []file, created time.Time) error {
	tw := tar.NewWriter(w)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: int64(f.mode.Perm()), Uid: f.uid, Gid: f.uid, ModTime: created.UTC(), Format: tar.FormatPAX,
			Typeflag: tar.TypeReg, Size: int64(len(f.body))}
		if f.mode&fs.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		if f.mode.IsDir() {
			h.Typeflag, h.Size = tar.TypeDir, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(f.body); err != nil {
			return err
		}
	}
	return tw.Close()
}

// WriteArchive writes idx as an OCI image-layout tar (oci-layout, index.json, blobs/), its
// index.json naming it ref (org.opencontainers.image.ref.name, and io.containerd.image.name for
// `ctr images import`).
func WriteArchive(w io.Writer, idx v1.ImageIndex, ref string, created time.Time) error {
	dir, err := os.MkdirTemp("", "detour-layout-")
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("image: writing the layout: %w", err)
	}
	if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref})); err != nil {
		return fmt.Errorf("image: writing the layout: %w", err)
	}
	files, err := layoutFiles(dir)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	if err := writeTar(w, files, created); err != nil {
		return fmt.Errorf("image: writing the archive: %w", err)
	}
	return nil
}

// layoutFiles reads the layout directory in name order.
func layoutFiles(dir string) ([]file, error) {
	var files []file
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			files = append(files, file{name: rel + "/", mode: 0o755 | fs.ModeDir})
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files = append(files, file{name: rel, mode: 0o644, body: b})
		return nil
	})
	slices.SortFunc(files, func(a, b file) int { return strings.Compare(a.name, b.name) })
	return files, err
}
