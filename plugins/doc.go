// Package plugins holds detour's krew plugin manifest (detour.yaml, filled at release by
// krew.sh) and the test that keeps it a manifest krew accepts.
package plugins
