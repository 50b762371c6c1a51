package image

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
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
	l, err := layer([]file{{name: strings.TrimPrefix(path, "/"), mode: 0o755, body: bin}}, created)
	if err != nil {
		return nil, err
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{Created: v1.Time{Time: created}, CreatedBy: "detour image: " + path}})
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", ref, err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = "linux", runtime.GOARCH, v1.Time{Time: created}
	cf.Config = v1.Config{Entrypoint: entrypoint, User: User}
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

