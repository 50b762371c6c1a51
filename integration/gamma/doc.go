// Package gamma replays the Gateway API mesh conformance suite (sigs.k8s.io/gateway-api/conformance,
// tests/mesh) through detour's waypoint: the suite's own manifests and expected responses, read
// from the module at test time, with Istio's echo server as echo-v1 and echo-v2 behind Istio's
// HBONE server, and Istio's HBONE client as the caller. See README.md.
package gamma
