package mesh

import (
	"encoding/json"
	"runtime"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// A DebugSession's spec, as any writer of DebugSessions in the namespace may set it, decodes into a
// remote session without panicking and at a bounded cost (its filter's regexes are bounded as a
// local registration's).
func FuzzDebugSession(f *testing.F) {
	f.Add([]byte(`{"session":{"namespace":"demo","service":"web","port":80,"mode":"steal","filter":{"header":"x-dev","headerRegex":"^a.*"}},` +
		`"holder":"spiffe://cluster.local/ns/dev/sa/alice","host":"web.demo.svc.cluster.local","replica":"10.244.0.9:15008","renewTime":"2026-01-02T03:04:05Z","ttlSeconds":30}`))
	f.Add([]byte(`{"session":{"mode":"mirror","filter":{"path":"` + strings.Repeat("a{1000}", 140) + `"}},"holder":"spiffe://td/x"}`))
	f.Add([]byte(`{"holder":"not a spiffe id","ttlSeconds":-1}`))
	f.Add([]byte(`{"session":7}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		var obj map[string]any
		if json.Unmarshal(raw, &obj) != nil {
			return
		}
		spec, err := decodeSpec(&unstructured.Unstructured{Object: map[string]any{"spec": obj}})
		if err != nil {
			return
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		s, err := remoteSession("id", spec, nil)
		runtime.ReadMemStats(&after)
		if cost := after.TotalAlloc - before.TotalAlloc; cost > 16<<20 {
			t.Fatalf("decoding cost %d MB", cost>>20)
		}
		if err == nil && (!s.Remote || s.ID != "id" || s.Holder.String() != spec.Holder) {
			t.Fatalf("remote session %+v from %+v", s, spec)
		}
	})
}

// A ttlSeconds that is not positive, or so large that the session of a dead replica would never
// expire (or overflow a Duration), makes the DebugSession unreadable.
func TestDebugSessionTTLBounded(t *testing.T) {
	for _, tc := range []struct {
		ttl  int64
		want string
	}{
		{30, ""},
		{3600, ""},
		{0, "mesh: DebugSession x: ttlSeconds 0 is outside 1..3600"},
		{-5, "mesh: DebugSession x: ttlSeconds -5 is outside 1..3600"},
		{3601, "mesh: DebugSession x: ttlSeconds 3601 is outside 1..3600"},
		{1 << 40, "mesh: DebugSession x: ttlSeconds 1099511627776 is outside 1..3600"},
	} {
		u := &unstructured.Unstructured{Object: map[string]any{"metadata": map[string]any{"name": "x"}, "spec": map[string]any{"ttlSeconds": tc.ttl}}}
		_, err := decodeSpec(u)
		if got := errText(err); got != tc.want {
			t.Errorf("ttlSeconds %d: %q, want %q", tc.ttl, got, tc.want)
		}
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
