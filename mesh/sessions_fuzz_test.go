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
