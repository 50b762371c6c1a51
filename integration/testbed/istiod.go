package testbed

import (
	"context"
	"errors"
)

// Istiod is a running istiod: its listen addresses.
type Istiod struct {
	HTTPAddr string // debug and readiness (/debug/ambientz, /ready)
	XDSAddr  string // plaintext xDS
	CAAddr   string // secure gRPC: the CA (IstioCertificateService) and xDS over TLS
}

func (c *Cluster) startIstiod(ctx context.Context, bins Binaries) error {
	return errors.New("testbed: istiod not wired yet")
}
