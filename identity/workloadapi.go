package identity

import (
	"context"
	"errors"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// WorkloadAPI takes the identity from a SPIFFE Workload API (SPIRE's agent, or any server of the
// API) and follows its rotations. It uses the default SVID and the bundle of its trust domain.
type WorkloadAPI struct {
	Addr   string       // e.g. unix:///run/spire/sockets/agent.sock; required (the config's identity.workloadAPI.addr)
	Logger *slog.Logger // nil means slog.Default()

	Holder
}

// Run watches the Workload API until ctx ends (go-spiffe retries a lost connection itself).
func (w *WorkloadAPI) Run(ctx context.Context) error {
	if w.Addr == "" {
		return errors.New("identity: workload API: no address")
	}
	err := workloadapi.WatchX509Context(ctx, w, workloadapi.WithAddr(w.Addr))
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (w *WorkloadAPI) log() *slog.Logger {
	if w.Logger != nil {
		return w.Logger
	}
	return slog.Default()
}

// OnX509ContextUpdate implements workloadapi.X509ContextWatcher.
func (w *WorkloadAPI) OnX509ContextUpdate(c *workloadapi.X509Context) {
	svid := c.DefaultSVID()
	if svid == nil {
		w.log().Warn("identity: workload API sent no SVID")
		return
	}
	bundle, err := c.Bundles.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
	if err != nil {
		w.log().Warn("identity: workload API sent no bundle for our trust domain", "td", svid.ID.TrustDomain().String(), "err", err)
		return
	}
	id := &Identity{SVID: svid, Bundle: bundle}
	if err := validate(id); err != nil {
		w.log().Warn("identity: workload API identity not usable, keeping the current one", "err", "identity: workload API: "+err.Error())
		return
	}
	w.Set(id)
	w.log().Info("identity: from the workload API", "id", svid.ID.String(), "expires", svid.Certificates[0].NotAfter)
}

// OnX509ContextWatchError implements workloadapi.X509ContextWatcher.
func (w *WorkloadAPI) OnX509ContextWatchError(err error) {
	w.log().Warn("identity: workload API", "err", err)
}
