// Command build writes detour's multi-platform image as an OCI image-layout tar (`make image`).
// It prints the index digest: the same source, version and -created give the same digest.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"time"

	"github.com/detour-mesh/detour/integration/image"
)

func main() {
	out := flag.String("o", "detour-image.tar", "the archive to write")
	source := flag.String("source", "..", "the detour module's root directory")
	version := flag.String("version", "", "detour's version: cli.Version, the label and the tag (required)")
	revision := flag.String("revision", "", "the commit, for the org.opencontainers.image.revision label")
	created := flag.Int64("created", -1, "every timestamp in the image, in Unix seconds (default: $SOURCE_DATE_EPOCH, else 0)")
	flag.Parse()
	if *created < 0 {
		*created = 0
		if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				fail(fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", s, err))
			}
			*created = n
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	o := image.Options{Source: *source, Version: *version, Revision: *revision, Created: time.Unix(*created, 0).UTC()}
	idx, err := image.Build(ctx, o)
	if err != nil {
		fail(err)
	}
	var buf bytes.Buffer
	if err := image.WriteArchive(&buf, idx, image.Ref(*version), o.Created); err != nil {
		fail(err)
	}
	if err := os.WriteFile(*out, buf.Bytes(), 0o644); err != nil {
		fail(err)
	}
	d, err := idx.Digest()
	if err != nil {
		fail(err)
	}
	fmt.Printf("%s: %s@%s (%d bytes)\n", *out, image.Ref(*version), d, buf.Len())
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "image:", err)
	os.Exit(1)
}
