// Package conformance runs the Gateway API mesh conformance suite's own Go code
// (sigs.k8s.io/gateway-api/conformance: utils/suite, tests/mesh) on the test bed's real node, with
// detour installed by its own CLI as the waypoint of the suite's namespace, the options set as
// Istio's ambient run sets them. Gated by DETOUR_CONFORMANCE=1 (`make conformance`); see README.md.
package conformance
