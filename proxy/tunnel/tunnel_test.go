package tunnel

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

func TestMessages(t *testing.T) {
	var buf bytes.Buffer
	in := Hello{Register: &Spec{Namespace: "demo", Service: "web", Port: 80, Mode: "steal", Filter: Filter{Header: "x-dev", HeaderValue: "alice"}}}
	if err := WriteMsg(&buf, in); err != nil {
		t.Fatal(err)
	}
	var out Hello
	if err := ReadMsg(&buf, &out); err != nil || *out.Register != *in.Register {
		t.Fatalf("round trip: %+v %v", out.Register, err)
	}
	for _, tc := range []struct {
		raw  string
		want string
	}{
		{`{"register":{"namespace":"demo","servcie":"web"}}`, `unknown field "servcie"`},
		{`{"list":true}{"list":true}`, "trailing data"},
		{`{"list":`, "unexpected EOF"},
	} {
		var h Hello
		err := ReadMsg(frame(tc.raw), &h)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.raw, err, tc.want)
		}
	}
	huge := make([]byte, 4)
	binary.BigEndian.PutUint32(huge, MaxMessage+1)
	if err := ReadMsg(bytes.NewReader(huge), &Hello{}); err == nil || !strings.Contains(err.Error(), "too large") {
		t.Errorf("oversized message: %v", err)
	}
}

func frame(s string) *bytes.Reader {
	b := make([]byte, 4, 4+len(s))
	binary.BigEndian.PutUint32(b, uint32(len(s)))
	return bytes.NewReader(append(b, s...))
}

// The registration decoder never panics, never reads past the message, and what it accepts
// re-encodes to an equal value.
func FuzzHello(f *testing.F) {
	f.Add([]byte(`{"register":{"namespace":"demo","service":"web","port":80,"mode":"steal","filter":{"header":"x-dev","headerRegex":"a.*"}}}`))
	f.Add([]byte(`{"list":true}`))
	f.Add([]byte(`{"register":{"port":70000}}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) > MaxMessage {
			return
		}
		var h Hello
		r := frame(string(raw))
		if err := ReadMsg(r, &h); err != nil {
			return
		}
		if r.Len() != 0 {
			t.Fatal("read past the message")
		}
		var buf bytes.Buffer
		if err := WriteMsg(&buf, h); err != nil {
			t.Fatal(err)
		}
		var again Hello
		if err := ReadMsg(&buf, &again); err != nil {
			t.Fatalf("re-decoding %s: %v", buf.String(), err)
		}
		if (h.Register == nil) != (again.Register == nil) || h.Register != nil && *h.Register != *again.Register || h.List != again.List {
			t.Fatalf("%+v != %+v", h, again)
		}
	})
}
