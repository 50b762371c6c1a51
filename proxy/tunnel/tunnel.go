// Package tunnel is the developer tunnel between a detour waypoint and a developer's CLI, over
// QUIC or, where only TCP reaches (a port-forward), HTTP/2 over TLS. Both ends authenticate
// with SPIFFE SVIDs (mutual TLS). The CLI opens one control stream and sends one Hello
// (register a session, or list sessions); the waypoint answers with a Reply and then sends
// Events (one per stolen request or stream) on it. Every stolen or mirrored stream or request is
// a new stream opened by the waypoint, starting with a Meta message, then raw bytes.
//
// Over HTTP/2 the roles of the TCP connection are reversed: the CLI dials, then runs the TLS and
// HTTP/2 *server* (an HTTP/2 server cannot open streams, and the waypoint must), and the waypoint
// opens HBONE-style CONNECT streams to it; the first one is the control stream.
//
// Messages are a 4-byte big-endian length and a JSON object, at most MaxMessage bytes.
package tunnel

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"
)

// ALPN protocol of the QUIC tunnel.
const ALPN = "detour-tunnel/1"

// MaxMessage bounds one control or Meta message.
const MaxMessage = 64 << 10

// MaxHello bounds the Hello, which the waypoint reads before it knows whether the developer may
// do anything: room for two regexes of 1 KiB (session.MaxRegex), escaped, and the names.
const MaxHello = 8 << 10

// Keepalive: a tunnel whose peer stays silent for DeadAfter is gone (the waypoint ends its
// sessions); each side pings every KeepaliveInterval.
const (
	KeepaliveInterval = time.Second
	DeadAfter         = 4 * time.Second
)

// controlTarget is the authority of the control stream over HTTP/2.
const controlTarget = "control.detour.internal:1"

// Mode is what a session does with the traffic it takes.
type Mode string

const (
	ModeSteal  Mode = "steal"  // the developer's app answers instead of the service
	ModeMirror Mode = "mirror" // the developer's app gets a copy; its answers are discarded
)

// Kind is what a data stream carries.
type Kind string

const (
	KindTCP   Kind = "tcp"   // one whole stream's bytes
	KindHTTP  Kind = "http"  // an HTTP connection carrying stolen or mirrored requests
	KindHBONE Kind = "hbone" // the egress link: HBONE with the developer's SVID
	KindProbe Kind = "probe" // asks only for an Ack (is the developer's side there?), then closes
)

// EventKind is what an Event reports.
type EventKind string

const (
	EventRequest EventKind = "request"
	EventStream  EventKind = "stream"
	// EventEnded: the waypoint ended the session (Error says why); the CLI does not re-register
	// it. A control stream that ends without one is a lost tunnel.
	EventEnded EventKind = "ended"
)

// Protocol is the tunnel protocol this build speaks: 1 is the protocol before the version
// exchange (a Hello or Reply without a protocol field), 2 adds the version exchange and resuming a
// session (CapResume). A peer of a higher protocol may send fields this build cannot read: the
// version fields are then read on their own (ReadHello, ReadReply) to name both versions.
const Protocol = 2

// CapResume: the CLI re-registers its session after a lost tunnel (Hello.Resume), and the
// waypoint keeps a session whose tunnel was lost for its grace period, waiting for that.
const CapResume = "resume"

// Hello is the CLI's first message.
type Hello struct {
	Register *Spec `json:"register,omitempty"` // open a session
	List     bool  `json:"list,omitempty"`     // list the waypoint's sessions
	// End ends the session with this ID (`detour sessions end`): its holder, or a principal
	// granted END, or the session's own method (STEAL or MIRROR), on its service port, may.
	End string `json:"end,omitempty"`
	// Egress asks for a data stream (Meta kind hbone) connected to the waypoint's HBONE listener,
	// over which the CLI speaks HBONE with its own SVID for the developer's outgoing connections.
	Egress bool `json:"egress,omitempty"`
	// AsTarget: the egress link's connections carry this service's workload identity instead of
	// the developer's (an AuthorizationPolicy must grant IMPERSONATE on it).
	AsTarget *Target `json:"asTarget,omitempty"`

	// The version exchange (protocol 2; an older CLI sends none of these fields).
	Version      string   `json:"version,omitempty"`      // the CLI's detour version, for messages
	Protocol     int      `json:"protocol,omitempty"`     // the tunnel protocol it speaks; 0 means 1
	Capabilities []string `json:"capabilities,omitempty"` // what it can do (CapResume)
	// Resume re-registers the session with this ID after the CLI lost its tunnel: the waypoint
	// re-attaches it to this tunnel when the same developer holds it with the same Register spec
	// (within the grace period), or registers it anew under this ID when no replica holds it.
	Resume string `json:"resume,omitempty"`
	// GraceSeconds: how long the waypoint should keep the session after its tunnel is lost,
	// waiting for a Resume (at most the waypoint's own grace; 0: the waypoint's). Only with
	// CapResume.
	GraceSeconds int `json:"graceSeconds,omitempty"`
}

// Has reports whether the CLI announced capability c.
func (h *Hello) Has(c string) bool { return slices.Contains(h.Capabilities, c) }

// Target names a service.
type Target struct {
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
}

// Spec is what a developer asks for.
type Spec struct {
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
	Port      uint16 `json:"port"` // service port; 0: the service's only port
	Mode      Mode   `json:"mode"` // steal or mirror
	Filter    Filter `json:"filter,omitzero"`
	// Bind asks the waypoint to bind the (unbound) service to itself for the session's life.
	Bind bool `json:"bind,omitempty"`
	// Force binds even where Istio config detour does not implement (a VirtualService, ...)
	// would apply to the service once bound; without it such a Bind is refused, naming each
	// object. Only with Bind.
	Force bool `json:"force,omitempty"`
}

// Filter selects HTTP requests; the zero Filter takes whole streams (any protocol). A request
// matches when every condition given holds (AND).
type Filter struct {
	Header      string `json:"header,omitempty"`      // header name
	HeaderValue string `json:"headerValue,omitempty"` // exact value
	HeaderRegex string `json:"headerRegex,omitempty"` // or an RE2 regex on the value
	// Headers are further header conditions, after Header's. A CLI sends its first header
	// condition in Header (which every waypoint reads) and only the others here, so a waypoint
	// older than Headers refuses a filter it cannot apply in full (unknown field) rather than
	// applying part of it.
	Headers []HeaderMatch `json:"headers,omitempty"`
	Path    string        `json:"path,omitempty"`   // RE2 regex on the path
	Method  string        `json:"method,omitempty"` // exact method
}

// HeaderMatch is one header condition: the header is present with a value equal to Value, or
// matching Regex, or (neither given) with any value.
type HeaderMatch struct {
	Name  string `json:"name"`
	Value string `json:"value,omitempty"`
	Regex string `json:"regex,omitempty"`
}

// IsZero reports whether f takes whole streams.
func (f Filter) IsZero() bool {
	return f.Header == "" && f.HeaderValue == "" && f.HeaderRegex == "" && len(f.Headers) == 0 && f.Path == "" && f.Method == ""
}

// HeaderMatches are all of f's header conditions, Header's first.
func (f Filter) HeaderMatches() []HeaderMatch {
	var all []HeaderMatch
	if f.Header != "" || f.HeaderValue != "" || f.HeaderRegex != "" {
		all = append(all, HeaderMatch{Name: f.Header, Value: f.HeaderValue, Regex: f.HeaderRegex})
	}
	return append(all, f.Headers...)
}

// WithHeaders sets f's header conditions: the first in Header, the others in Headers.
func (f Filter) WithHeaders(hs []HeaderMatch) Filter {
	f.Header, f.HeaderValue, f.HeaderRegex, f.Headers = "", "", "", nil
	if len(hs) > 0 {
		f.Header, f.HeaderValue, f.HeaderRegex = hs[0].Name, hs[0].Value, hs[0].Regex
		f.Headers = append([]HeaderMatch(nil), hs[1:]...)
	}
	if len(f.Headers) == 0 {
		f.Headers = nil
	}
	return f
}

// Reply answers a Hello.
type Reply struct {
	OK       bool          `json:"ok"`
	Error    string        `json:"error,omitempty"`
	Session  string        `json:"session,omitempty"` // the new session's ID
	Sessions []SessionInfo `json:"sessions,omitempty"`

	// The version exchange (protocol 2; an older waypoint sends none of these fields).
	Version      string   `json:"version,omitempty"`      // the waypoint's detour version
	Protocol     int      `json:"protocol,omitempty"`     // the tunnel protocol it speaks; 0 means 1
	Capabilities []string `json:"capabilities,omitempty"` // CapResume: it keeps sessions for a Resume
	// GraceSeconds: how long the waypoint keeps this session after its tunnel is lost (0: it
	// ends with the tunnel).
	GraceSeconds int `json:"graceSeconds,omitempty"`
}

// Retry ends the error of a refusal that is only for now (the session is busy moving between
// tunnels): the CLI asks again after its backoff instead of giving up.
const Retry = "; retry"

// Has reports whether the waypoint announced capability c.
func (r *Reply) Has(c string) bool { return slices.Contains(r.Capabilities, c) }

// SessionInfo describes a session for `detour sessions`.
type SessionInfo struct {
	ID       string    `json:"id"`
	Holder   string    `json:"holder"` // SPIFFE ID
	Spec     Spec      `json:"spec"`
	Since    time.Time `json:"since"`
	Streams  int64     `json:"streams"`
	Requests int64     `json:"requests"`
	Dropped  int64     `json:"dropped"` // mirror data lost to a slow developer
}

// Event reports one stolen or mirrored request or stream to the CLI.
type Event struct {
	Kind     EventKind `json:"kind"`
	Mode     Mode      `json:"mode"`
	Method   string    `json:"method,omitempty"`
	Path     string    `json:"path,omitempty"`
	Status   int       `json:"status,omitempty"`
	Micros   int64     `json:"us,omitempty"`
	Received int64     `json:"received,omitempty"`
	Sent     int64     `json:"sent,omitempty"`
	Source   string    `json:"source,omitempty"`
	Error    string    `json:"error,omitempty"`
}

// Meta starts every data stream.
type Meta struct {
	Session  string `json:"session"`
	Kind     Kind   `json:"kind"`
	Mode     Mode   `json:"mode"`
	Protocol string `json:"protocol,omitempty"` // http: http/1.1 or h2c
	Target   string `json:"target,omitempty"`   // the stream's original destination
	Source   string `json:"source,omitempty"`   // the client's SPIFFE ID
}

// Ack answers a data stream's Meta, from the CLI: the stream is connected to the developer's app
// (OK), or not (Error). The waypoint answers its client only after an OK, and sends the traffic to
// the real service otherwise: a developer whose tunnel or app just went away fails nothing.
type Ack struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// AckTimeout bounds the wait for a data stream's Ack (plus twice the tunnel's round trip, when
// known): the CLI answers once its app accepted a TCP connection, which takes milliseconds for a
// healthy developer. Past it the traffic goes to the real service, well before DeadAfter says the
// tunnel is gone.
const AckTimeout = time.Second

// ErrTooLarge: a message over MaxMessage.
var ErrTooLarge = errors.New("tunnel: message too large")

// WriteMsg writes v as one message.
func WriteMsg(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > MaxMessage {
		return ErrTooLarge
	}
	buf := make([]byte, 4, 4+len(b))
	binary.BigEndian.PutUint32(buf, uint32(len(b)))
	_, err = w.Write(append(buf, b...))
	return err
}

// ReadMsg reads one message into v; unknown fields are refused, so a typo never passes silently.
func ReadMsg(r io.Reader, v any) error { return ReadMsgMax(r, v, MaxMessage) }

// ReadHello reads the CLI's Hello, at most MaxHello bytes. A Hello this build cannot decode
// from a CLI that announces a higher protocol is a *SkewError naming the CLI's version.
func ReadHello(r io.Reader) (Hello, error) {
	var h Hello
	b, err := readFrame(r, MaxHello)
	if err != nil {
		return h, err
	}
	if err := decode(b, &h); err != nil {
		return h, skewed(b, err)
	}
	return h, nil
}

// ReadReply reads the waypoint's Reply; like ReadHello, one from a waypoint of a higher protocol
// that this build cannot decode is a *SkewError.
func ReadReply(r io.Reader) (Reply, error) {
	var rp Reply
	b, err := readFrame(r, MaxMessage)
	if err != nil {
		return rp, err
	}
	if err := decode(b, &rp); err != nil {
		return rp, skewed(b, err)
	}
	return rp, nil
}

// SkewError: the peer speaks a higher tunnel protocol and sent a message this build cannot read.
type SkewError struct {
	Version  string // the peer's detour version ("" if it sent none)
	Protocol int    // the peer's tunnel protocol
	Err      error  // the decoding error
}

func (e *SkewError) Error() string {
	return fmt.Sprintf("tunnel: the peer runs detour %s (tunnel protocol %d, this build speaks %d): %v", orUnknown(e.Version), e.Protocol, Protocol, e.Err)
}

func (e *SkewError) Unwrap() error { return e.Err }

func orUnknown(v string) string {
	if v == "" {
		return "(unknown version)"
	}
	return v
}

// skewed turns err, the strict decoding error of b, into a *SkewError when b's version fields,
// read on their own, announce a higher protocol than this build's.
func skewed(b []byte, err error) error {
	var v struct {
		Version  string `json:"version"`
		Protocol int    `json:"protocol"`
	}
	if json.Unmarshal(b, &v) != nil || v.Protocol <= Protocol {
		return err
	}
	return &SkewError{Version: v.Version, Protocol: v.Protocol, Err: err}
}

// ReadMsgMax is ReadMsg for a message of at most limit bytes (and MaxMessage); a longer one is
// refused (ErrTooLarge) from its length, before its body is read.
func ReadMsgMax(r io.Reader, v any, limit int) error {
	b, err := readFrame(r, limit)
	if err != nil {
		return err
	}
	return decode(b, v)
}

// readFrame reads one message's bytes, at most limit (and MaxMessage).
func readFrame(r io.Reader, limit int) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxMessage || int64(n) > int64(limit) {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrTooLarge, n, min(limit, MaxMessage))
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("tunnel: reading a %d-byte message: %w", n, err)
	}
	return b, nil
}

// decode decodes b strictly: unknown fields and trailing data are refused.
func decode(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("tunnel: decoding a message: %w", err)
	}
	if dec.More() {
		return errors.New("tunnel: trailing data after a message")
	}
	return nil
}

// Equal reports whether f and g select the same requests, condition by condition.
func (f Filter) Equal(g Filter) bool {
	return f.Header == g.Header && f.HeaderValue == g.HeaderValue && f.HeaderRegex == g.HeaderRegex &&
		slices.Equal(f.Headers, g.Headers) && f.Path == g.Path && f.Method == g.Method
}

// Equal reports whether s and o ask for the same session.
func (s Spec) Equal(o Spec) bool {
	return s.Namespace == o.Namespace && s.Service == o.Service && s.Port == o.Port && s.Mode == o.Mode &&
		s.Bind == o.Bind && s.Filter.Equal(o.Filter)
}
