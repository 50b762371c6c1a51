// Package chart tests detour's Helm chart (charts/detour, generated from mesh.Installer) with
// Helm's own packages: `helm template` renders what `detour install --print` prints for the same
// values, and `helm lint` is clean. Helm stays in this module, out of detour's go.mod.
package chart
