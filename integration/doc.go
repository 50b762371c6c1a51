// Package integration holds detour's tests against real peers: Istio's own Go HBONE code
// (istio.io/istio/pkg/hbone) in both directions. It is a separate module so that istio.io/istio
// and its dependencies stay out of detour's go.mod.
package integration
