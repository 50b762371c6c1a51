package waypoint

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// The relay headers another replica sends decode without panicking; what is accepted is a
// session stream's Meta that re-encodes to an equal value.
func FuzzRelayHeaders(f *testing.F) {
	f.Add("a1b2c3d4e5f6", `{"session":"a1b2c3d4e5f6","kind":"tcp","mode":"steal","target":"10.96.0.10:80","source":"cluster.local/ns/a/sa/b"}`)
	f.Add("x", `{"kind":"http","protocol":"h2c"}`)
	f.Add("x", `{"kind":"hbone"}`)
	f.Add("", `{"kind":"tcp"}{"kind":"tcp"}`)
	f.Add("", `null`)
	f.Fuzz(func(t *testing.T, session, meta string) {
		h := http.Header{headerRelaySession: {session}, headerRelayMeta: {meta}}
		id, m, err := relayHeaders(h)
		if err != nil {
			return
		}
		if id != session || m.Kind != "tcp" && m.Kind != "http" {
			t.Fatalf("accepted session %q, meta %+v", id, m)
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var again tunnel.Meta
		if err := json.Unmarshal(b, &again); err != nil || again != m {
			t.Fatalf("%+v re-decodes as %+v (%v)", m, again, err)
		}
	})
}

// A relayed stream is a session's stream (tcp or http), with a strictly decoded Meta.
func TestRelayHeaders(t *testing.T) {
	for _, tc := range []struct{ meta, want string }{
		{`{"kind":"tcp","target":"10.96.0.10:80"}`, ""},
		{`{"kind":"hbone"}`, `waypoint: hbone: malformed authority: relay meta: kind "hbone" is not tcp, http or probe`},
		{`{"kind":"tcp","egress":true}`, `waypoint: hbone: malformed authority: relay meta: json: unknown field "egress"`},
		{`{"kind":"tcp"} {"kind":"tcp"}`, `waypoint: hbone: malformed authority: relay meta: trailing data`},
	} {
		_, _, err := relayHeaders(http.Header{headerRelaySession: {"s"}, headerRelayMeta: {tc.meta}})
		if got := fmt.Sprint(err); tc.want == "" && err != nil || tc.want != "" && got != tc.want {
			t.Errorf("%s: %v, want %q", tc.meta, err, tc.want)
		}
	}
}
