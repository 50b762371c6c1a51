//go:build !linux

// Package agent is detour's fallback for sidecar-mode pods. It redirects traffic with iptables
// and conntrack inside a pod's network namespace, so it is built on Linux only; on other systems
// the package is empty.
package agent
