package image

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The test bed node's images (issue 18, point 2), named in a registry that does not exist: the
// node never pulls (imagePullPolicy Never, and containerd's sandbox image is imported first).
const (
	PauseRef  = "testbed.invalid/pause:podapp"
	PodAppRef = "testbed.invalid/podapp:podapp"
)

// NodeImages builds the pause image and the test app image for this machine's architecture, each
// an OCI image-layout archive (for `ctr images import`) of one layer: the static podapp binary
// (image/podapp, the standard library only), as /pause (entrypoint `/pause pause`) and as
// /podapp (entrypoint `/podapp serve :8080`), run as uid 65532.
func NodeImages(ctx context.Context, created time.Time) (pause, app []byte, err error) {
	dir, err := os.MkdirTemp("", "detour-podapp-")
	if err != nil {
		return nil, nil, fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "podapp")
	env := []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=" + runtime.GOARCH, "GOFLAGS=-buildvcs=false"}
	if err := goBuild(ctx, "", env, "-trimpath", "-ldflags", "-s -w -buildid=", "-o", out,
		"github.com/detour-mesh/detour/integration/image/podapp"); err != nil {
		return nil, nil, fmt.Errorf("image: building podapp: %w", err)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		return nil, nil, fmt.Errorf("image: %w", err)
	}
	if pause, err = programArchive(bin, "/pause", []string{"/pause", "pause"}, PauseRef, created); err != nil {
		return nil, nil, err
	}
	if app, err = programArchive(bin, "/podapp", []string{"/podapp", "serve", ":8080"}, PodAppRef, created); err != nil {
		return nil, nil, err
	}
	return pause, app, nil
}

// programArchive is an archive of a one-platform image whose only file is bin at path.
func programArchive(bin []byte, path string, entrypoint []string, ref string, created time.Time) ([]byte, error) {
	return imageArchive([]file{{name: strings.TrimPrefix(path, "/"), mode: 0o755, body: bin}}, entrypoint, User, ref, created)
}

// imageArchive is an archive of a one-platform image of one layer of files.
func imageArchive(files []file, entrypoint []string, user, ref string, created time.Time) ([]byte, error) {
	l, err := layer(files, created)
	if err != nil {
		return nil, err
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{Created: v1.Time{Time: created}, CreatedBy: "detour image: " + ref}})
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", ref, err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = "linux", runtime.GOARCH, v1.Time{Time: created}
	cf.Config = v1.Config{Entrypoint: entrypoint, User: user}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, fmt.Errorf("image: %s: %w", ref, err)
	}
	plat := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &plat}})
	var buf bytes.Buffer
	if err := WriteArchive(&buf, idx, ref, created); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// EchoRef names Istio's echo app image (issue 18, point 2), the app the Gateway API mesh
// conformance suite's pods run.
const EchoRef = "testbed.invalid/istio-echo:podapp"

// EchoImage builds Istio's echo app image as Istio's pkg/test/echo/docker/Dockerfile.app lays it
// out, from the istio.io/istio module in this module's go.mod: the server and client commands
// (pkg/test/echo/cmd/server, .../client, static) at /usr/local/bin, the test certificate and key
// of tests/testdata/certs/dns at /cert.crt and /cert.key, user 1338 (named "application" in
// /etc/passwd), entrypoint /usr/local/bin/server. istioDir is the module's source directory.
func EchoImage(ctx context.Context, istioDir string, created time.Time) ([]byte, error) {
	dir, err := os.MkdirTemp("", "detour-echo-")
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(dir)
	env := []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=" + runtime.GOARCH, "GOFLAGS=-buildvcs=false"}
	files := []file{
		{name: "etc/", mode: 0o755 | fs.ModeDir},
		{name: "etc/group", mode: 0o644, body: []byte("root:x:0:\napplication:x:1338:\n")},
		{name: "etc/passwd", mode: 0o644, body: []byte("root:x:0:0:root:/root:/sbin/nologin\napplication:x:1338:1338:application:/home/application:/sbin/nologin\n")},
		{name: "home/", mode: 0o755 | fs.ModeDir},
		{name: "home/application/", mode: 0o755 | fs.ModeDir, uid: 1338},
		{name: "tmp/", mode: 0o777 | fs.ModeDir | fs.ModeSticky},
		{name: "usr/", mode: 0o755 | fs.ModeDir}, {name: "usr/local/", mode: 0o755 | fs.ModeDir}, {name: "usr/local/bin/", mode: 0o755 | fs.ModeDir},
	}
	for _, cmd := range []string{"client", "server"} {
		out := filepath.Join(dir, cmd)
		if err := goBuild(ctx, "", env, "-trimpath", "-ldflags", "-s -w -buildid=", "-o", out, "istio.io/istio/pkg/test/echo/cmd/"+cmd); err != nil {
			return nil, fmt.Errorf("image: building Istio's echo %s: %w", cmd, err)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
		files = append(files, file{name: "usr/local/bin/" + cmd, mode: 0o755, body: b})
	}
	for name, src := range map[string]string{"cert.crt": "cert-chain.pem", "cert.key": "key.pem"} {
		b, err := os.ReadFile(filepath.Join(istioDir, "tests/testdata/certs/dns", src))
		if err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
		files = append(files, file{name: name, mode: 0o644, body: b})
	}
	slices.SortFunc(files, func(a, b file) int { return strings.Compare(a.name, b.name) })
	return imageArchive(files, []string{"/usr/local/bin/server"}, "1338", EchoRef, created)
}
