// Package arch holds tests that keep the code shaped as ARCHITECTURE.md describes it: which
// packages may import what, and that every package documents itself.
package arch
