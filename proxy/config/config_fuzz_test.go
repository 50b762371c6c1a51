package config

import (
	"strings"
	"testing"
)

// Decoding a document never panics, and what it accepts builds its route table and policy engine
// (or refuses with an error) without panicking.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(example))
	f.Add([]byte(strings.Replace(example, "vips: [10.96.0.10]", "vips: [10.96.0.10, '::1', 300.1.1.1]", 1)))
	f.Add([]byte("listeners: {hbone: ':15008'}\nwaypoint: {inspect: always, bindTTL: 1h}\n"))
	f.Add([]byte("discovery: {source: kubernetes, kubernetes: {}}\n"))
	f.Add([]byte("identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, drain: {period: 1s, timeout: 0s}}\ndiscovery: {source: kubernetes}\n"))
	f.Add([]byte("a: &a [*a, *a]\n"))
	f.Add([]byte("identity: {source: devca, devca: {dir: d, id: spiffe://x/ns/a/sa/b}}\nwaypoint: {namespace: demo}\ndiscovery:\n  static:\n    extensionProviders:\n" +
		"    - {name: g, envoyExtAuthzGrpc: {service: a, port: 1, timeout: 1s, statusOnError: '503'}}\n" +
		"    - {name: h, envoyExtAuthzHttp: {service: b, port: 2, pathPrefix: /x, includeRequestBodyInCheck: {maxRequestBytes: 10}}}\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		if len(doc) > 64<<10 {
			return
		}
		c, err := Decode(doc)
		if err != nil {
			return
		}
		if d := c.Waypoint.Drain; d.Period == nil || d.Timeout == nil || d.Period.Duration < 0 || d.Timeout.Duration < 0 {
			t.Fatalf("decoded drain without its defaults or negative: %+v", d)
		}
		if c.Discovery.Source != "kubernetes" {
			c.Routes()
		}
		c.Authz()
		c.ExtensionProviders()
	})
}
