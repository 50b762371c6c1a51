package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/detour-mesh/detour/mesh"
)

// check refuses, before any network call, tunnel flags that conflict or are incomplete, one
// line each.
func (f *tunnelFlags) check(fl *pflag.FlagSet) error { return f.checkFor(fl, false) }

// checkFor is check for a command with a target service: canFind lets it go without --waypoint
// and --port-forward (findWaypoint looks the service's waypoint up).
func (f *tunnelFlags) checkFor(fl *pflag.FlagSet, canFind bool) error {
	if f.waypoint != "" && f.portForward != "" {
		return errors.New("--waypoint and --port-forward exclude each other: give one (a port-forward finds the waypoint's pod itself)")
	}
	if f.waypoint == "" && f.portForward == "" && !canFind {
		return errors.New("--waypoint or --port-forward is required")
	}
	if f.waypoint == "" && f.portForward == "" && f.transport == "quic" && fl.Changed("transport") {
		return errors.New("--transport quic needs --waypoint: without it the waypoint is reached by a port-forward, which carries TCP only (h2)")
	}
	if f.transport != "quic" && f.transport != "h2" {
		return fmt.Errorf("--transport %q: want quic or h2", f.transport)
	}
	if f.portForward != "" && f.transport == "quic" && fl.Changed("transport") {
		return errors.New("--transport quic and --port-forward exclude each other: a port-forward carries TCP only (h2)")
	}
	if f.portForward != "" {
		if ns, name, _ := strings.Cut(f.portForward, "/"); ns == "" || strings.Contains(name, "/") {
			return fmt.Errorf("--port-forward %q: want NAMESPACE or NAMESPACE/WAYPOINT", f.portForward)
		}
	}
	if f.waypointID != "" {
		if _, err := spiffeid.FromString(f.waypointID); err != nil {
			return fmt.Errorf("--waypoint-id %q: %w", f.waypointID, err)
		}
	}
	return f.checkIdentity(fl)
}

// checkIdentity wants exactly one identity, whole.
func (f *tunnelFlags) checkIdentity(fl *pflag.FlagSet) error {
	var given []string
	if f.serviceAccount != "" {
		given = append(given, "--service-account")
	}
	if f.caDir != "" || f.id != "" {
		given = append(given, "--ca")
	}
	if f.cert != "" || f.key != "" || f.bundle != "" {
		given = append(given, "--cert")
	}
	switch {
	case len(given) == 0:
		return errors.New("an identity is required: --service-account NS/NAME (istiod's CA), --ca DIR --id SPIFFE-ID, or --cert, --key and --bundle")
	case len(given) > 1:
		return fmt.Errorf("%s and %s exclude each other: give one identity", given[0], given[1])
	}
	if (f.caDir == "") != (f.id == "") {
		return errors.New("--ca and --id go together: the dev CA mints the SPIFFE ID")
	}
	if f.cert != "" || f.key != "" || f.bundle != "" {
		var missing []string
		for flag, v := range map[string]string{"--cert": f.cert, "--key": f.key, "--bundle": f.bundle} {
			if v == "" {
				missing = append(missing, flag)
			}
		}
		if len(missing) > 0 {
			slices.Sort(missing)
			return fmt.Errorf("--cert, --key and --bundle go together: %s missing", strings.Join(missing, " and "))
		}
	}
	if f.serviceAccount == "" && (fl.Changed("istiod") || f.meshRoot != "") {
		return errors.New("--istiod and --mesh-root are for --service-account only")
	}
	if f.id != "" {
		if _, err := spiffeid.FromString(f.id); err != nil {
			return fmt.Errorf("--id %q: %w", f.id, err)
		}
	}
	if f.serviceAccount != "" {
		if ns, name, ok := strings.Cut(f.serviceAccount, "/"); !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return fmt.Errorf("--service-account %q: want NAMESPACE/NAME", f.serviceAccount)
		}
	}
	return nil
}

// namespace is ns, else the kubeconfig context's namespace (read from the file, no cluster
// contacted), else "default". A --context that the kubeconfig lacks is an error.
func (f *tunnelFlags) namespace(ns string) (string, error) {
	if ns != "" {
		return ns, nil
	}
	_, ctxNS, err := mesh.UserContext(f.kubeconfig, f.kubeContext)
	switch {
	case err != nil && f.kubeContext != "":
		return "", fmt.Errorf("--context %s: %w", f.kubeContext, err)
	case err != nil || ctxNS == "":
		return "default", nil
	}
	return ctxNS, nil
}

// findWaypoint, when neither --waypoint nor --port-forward is given, finds the waypoint of
// namespace/svc from its istio.io/use-waypoint label (else its namespace's), as istiod resolves
// it (mesh.FindWaypoint), reaches it by a port-forward, and says which on out.
func (f *tunnelFlags) findWaypoint(ctx context.Context, namespace, svc string, out io.Writer) error {
	if f.waypoint != "" || f.portForward != "" {
		return nil
	}
	c, err := mesh.UserClientsContext(f.kubeconfig, f.kubeContext)
	if err == nil {
		var ref mesh.WaypointRef
		if ref, err = mesh.FindWaypoint(ctx, c.Kube, namespace, svc); err == nil {
			f.portForward, f.transport = ref.Namespace+"/"+ref.Name, "h2"
			fmt.Fprintf(out, "waypoint %s/%s (from %s), through a port-forward\n", ref.Namespace, ref.Name, ref.From)
			return nil
		}
	}
	return fmt.Errorf("no --waypoint or --port-forward, and the service's waypoint was not found: %w", err)
}
