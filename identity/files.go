package identity

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// DefaultPollInterval is how often Files looks at its files.
const DefaultPollInterval = 2 * time.Second

// Files reads an SVID and a bundle from PEM files (cert-manager, istio-csr, mounted secrets)
// and reloads them when they change. A file caught half-written, or any set that does not form a
// valid identity, is ignored: the previous identity stays until the files are valid again.
type Files struct {
	CertFile   string        // certificate chain, leaf first
	KeyFile    string        // private key (PKCS#8, EC or RSA PEM)
	BundleFile string        // trust bundle: the CA certificates peers chain to
	Interval   time.Duration // poll interval; 0 means DefaultPollInterval
	Logger     *slog.Logger  // nil means slog.Default()

	Holder
	last []byte // owned by Run: the contents last loaded
}

// Fetch loads the files once and returns the identity, or why they do not form one.
func (f *Files) Fetch() (*Identity, error) {
	id, _, err := f.load()
	return id, err
}

func (f *Files) load() (*Identity, []byte, error) {
	var all []byte
	read := func(path, what string) ([]byte, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("identity: files: reading the %s: %w", what, err)
		}
		all = append(append(all, b...), 0)
		return b, nil
	}
	cert, err := read(f.CertFile, "certificate")
	if err != nil {
		return nil, nil, err
	}
	key, err := read(f.KeyFile, "key")
	if err != nil {
		return nil, nil, err
	}
	bundlePEM, err := read(f.BundleFile, "bundle")
	if err != nil {
		return nil, nil, err
	}
	svid, err := x509svid.Parse(cert, key)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: files: %s and %s: %w", f.CertFile, f.KeyFile, err)
	}
	bundle, err := x509bundle.Parse(svid.ID.TrustDomain(), bundlePEM)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: files: %s: %w", f.BundleFile, err)
	}
	id := &Identity{SVID: svid, Bundle: bundle}
	if err := validate(id); err != nil {
		return nil, nil, fmt.Errorf("identity: files: %w", err)
	}
	return id, all, nil
}

// Run loads the files now and again whenever their contents change, until ctx ends.
func (f *Files) Run(ctx context.Context) error {
	interval := f.Interval
	if interval <= 0 {
		interval = DefaultPollInterval
	}
	log := f.Logger
	if log == nil {
		log = slog.Default()
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastErr string
	for {
		id, contents, err := f.load()
		switch {
		case err != nil:
			if err.Error() != lastErr {
				log.Warn("identity: files not usable, keeping the current identity", "err", err)
				lastErr = err.Error()
			}
		case !bytes.Equal(contents, f.last):
			f.last = contents
			lastErr = ""
			f.Set(id)
			log.Info("identity: loaded", "id", id.SVID.ID.String(), "expires", id.SVID.Certificates[0].NotAfter)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
