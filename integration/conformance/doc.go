// Package conformance runs the Gateway API mesh conformance suite's own Go code
// (sigs.k8s.io/gateway-api/conformance: utils/suite, tests/mesh) on the test bed's real node, with
// detour installed by its own CLI as the waypoint of the suite's namespace, the options set as
// Istio's ambient run sets them. Part of `make test` where the node can run (DETOUR_CONFORMANCE=0
// skips it); `make conformance` runs it alone, verbose. See README.md.
package conformance
