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
	f.Add([]byte("a: &a [*a, *a]\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		if len(doc) > 64<<10 {
			return
		}
		c, err := Decode(doc)
		if err != nil {
			return
		}
		if c.Discovery.Source != "kubernetes" {
			c.Routes()
		}
		c.Authz()
	})
}
