package tunnel

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// One header condition travels as before Headers existed (so every waypoint reads it); the
// others in headers, which a waypoint that predates them refuses as an unknown field.
func TestFilterHeadersWire(t *testing.T) {
	hs := []HeaderMatch{{Name: "x-dev", Value: "alice"}, {Name: "x-team", Regex: "^pay"}, {Name: "x-debug"}}
	for _, tc := range []struct {
		headers []HeaderMatch
		want    string
	}{
		{nil, `{"path":"^/api"}`},
		{hs[:1], `{"header":"x-dev","headerValue":"alice","path":"^/api"}`},
		{hs, `{"header":"x-dev","headerValue":"alice","headers":[{"name":"x-team","regex":"^pay"},{"name":"x-debug"}],"path":"^/api"}`},
	} {
		f := Filter{Path: "^/api"}.WithHeaders(tc.headers)
		b, err := json.Marshal(f)
		if err != nil || string(b) != tc.want {
			t.Errorf("%v: %s %v, want %s", tc.headers, b, err, tc.want)
		}
		if got := f.HeaderMatches(); !reflect.DeepEqual(got, tc.headers) {
			t.Errorf("%v: HeaderMatches %v", tc.headers, got)
		}
	}
	if !(Filter{}).WithHeaders(nil).IsZero() || (Filter{Headers: hs[1:2]}).IsZero() {
		t.Error("IsZero")
	}
}

func TestMessages(t *testing.T) {
	var buf bytes.Buffer
	in := Hello{Register: &Spec{Namespace: "demo", Service: "web", Port: 80, Mode: "steal", Filter: Filter{Header: "x-dev", HeaderValue: "alice"}}}
	if err := WriteMsg(&buf, in); err != nil {
		t.Fatal(err)
	}
	var out Hello
	if err := ReadMsg(&buf, &out); err != nil || !reflect.DeepEqual(out.Register, in.Register) {
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
	f.Add([]byte(`{"register":{"mode":"steal","filter":{"header":"x-dev","headerValue":"a","headers":[{"name":"x-b","regex":"^b"},{"name":"x-c"}]}}}`))
	f.Add([]byte(`{"list":true}`))
	f.Add([]byte(`{"register":{"port":70000}}`))
	f.Add([]byte(`{"register":{"namespace":"demo","service":"web","port":80,"mode":"steal"},"version":"v1","protocol":2,"capabilities":["resume"],"resume":"0123456789ab","graceSeconds":30}`))
	f.Add([]byte(`{"register":{"namespace":"demo","sticky":1},"version":"v9","protocol":9}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) > MaxMessage {
			return
		}
		r := frame(string(raw))
		h, err := ReadHello(r)
		if se := (*SkewError)(nil); errors.As(err, &se) && se.Protocol <= Protocol {
			t.Fatalf("a skew error for protocol %d, this build's is %d", se.Protocol, Protocol)
		}
		if err != nil {
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
		// Compared as re-encoded: an empty headers list decodes to a non-nil slice, omitted once encoded.
		was, _ := json.Marshal(h.Register)
		is, _ := json.Marshal(again.Register)
		if (h.Register == nil) != (again.Register == nil) || !bytes.Equal(was, is) || h.List != again.List ||
			h.Version != again.Version || h.Protocol != again.Protocol || h.Resume != again.Resume || h.GraceSeconds != again.GraceSeconds ||
			!slices.Equal(h.Capabilities, again.Capabilities) {
			t.Fatalf("%+v != %+v", h, again)
		}
	})
}

// Every other message a peer sends (the waypoint's Reply and Events to the CLI, the Meta of a
// data stream, the CLI's Ack) decodes without panicking, never past its message, and what it
// accepts re-encodes to an equal value. kind picks the type.
func FuzzMessages(f *testing.F) {
	f.Add(uint8(0), []byte(`{"ok":true,"session":"a1b2c3","sessions":[{"id":"x","holder":"spiffe://td/ns/a/sa/b","spec":{"namespace":"demo","service":"web","port":80,"mode":"steal"},"since":"2026-01-02T03:04:05Z","streams":1}]}`))
	f.Add(uint8(0), []byte(`{"ok":false,"error":"refused"}`))
	f.Add(uint8(0), []byte(`{"ok":true,"session":"0123456789ab","version":"v1","protocol":2,"capabilities":["resume"],"graceSeconds":30}`))
	f.Add(uint8(0), []byte(`{"ok":true,"version":"v9","protocol":9,"lease":"x"}`))
	f.Add(uint8(1), []byte(`{"kind":"request","mode":"steal","method":"GET","path":"/","status":200,"us":12,"source":"td/ns/a/sa/b"}`))
	f.Add(uint8(1), []byte(`{"kind":"stream","received":-1,"sent":9223372036854775807}`))
	f.Add(uint8(2), []byte(`{"session":"s","kind":"http","mode":"mirror","protocol":"h2c","target":"10.0.0.1:80","source":"td/ns/a/sa/b"}`))
	f.Add(uint8(3), []byte(`{"ok":true}`))
	f.Add(uint8(3), []byte(`{"ok":false,"error":"dial tcp: connection refused"}`))
	f.Fuzz(func(t *testing.T, kind uint8, raw []byte) {
		if len(raw) > MaxMessage {
			return
		}
		var v, again any
		switch kind % 4 {
		case 0:
			v, again = new(Reply), new(Reply)
		case 1:
			v, again = new(Event), new(Event)
		case 2:
			v, again = new(Meta), new(Meta)
		default:
			v, again = new(Ack), new(Ack)
		}
		r := frame(string(raw))
		var err error
		if rp, ok := v.(*Reply); ok {
			*rp, err = ReadReply(r)
		} else {
			err = ReadMsg(r, v)
		}
		if err != nil {
			return
		}
		if r.Len() != 0 {
			t.Fatal("read past the message")
		}
		var buf bytes.Buffer
		if err := WriteMsg(&buf, v); err != nil {
			if errors.Is(err, ErrTooLarge) {
				return // re-encoding may escape characters the input carried raw
			}
			t.Fatal(err)
		}
		if err := ReadMsg(&buf, again); err != nil {
			t.Fatalf("re-decoding %s: %v", buf.String(), err)
		}
		if !reflect.DeepEqual(normalize(v), normalize(again)) {
			t.Fatalf("%+v != %+v", v, again)
		}
	})
}

// normalize drops what a JSON round trip cannot keep: a time's location, an empty (omitted) list.
func normalize(v any) any {
	if r, ok := v.(*Reply); ok {
		c := *r
		c.Sessions = slices.Clip(slices.Clone(r.Sessions))
		if len(c.Sessions) == 0 {
			c.Sessions = nil
		}
		if len(c.Capabilities) == 0 {
			c.Capabilities = nil
		}
		for i := range c.Sessions {
			c.Sessions[i].Since = c.Sessions[i].Since.UTC()
		}
		return &c
	}
	return v
}
