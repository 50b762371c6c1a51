package hbone

import "time"

// A server connection's abuse budget. A peer can make a connection work for nothing: open
// streams and reset them before they are answered (HTTP/2 rapid reset, CVE-2023-44487), keep
// opening streams past SETTINGS_MAX_CONCURRENT_STREAMS so that each is refused, or send frames
// that carry nothing. Refusing these one by one costs a handler start, an RST_STREAM and reader
// time each, for a few bytes of the peer's; so past a budget the connection gets
// GOAWAY(ENHANCE_YOUR_CALM) and is closed, as Go's net/http (x/net/http2 "too_many_early_resets")
// and Envoy (premature resets, max_consecutive_inbound_frames_with_empty_payload) do.
const (
	// wasteFloor is how many streams a peer may waste before the ratio is checked at all: Envoy's
	// premature_reset_total_stream_count default (500). A handful of cancelled dials on a
	// connection that carried ten thousand good streams never closes it.
	wasteFloor = 500
	// wasteWindow: once this many streams were opened, both counts are halved, so the ratio
	// follows the last few thousand streams and a long good history cannot hide a flood.
	wasteWindow = 10000
	// prematureAge: a reset this soon after the stream opened, before it was answered, is
	// premature (Envoy's premature_reset_min_stream_lifetime_seconds, 1 s). A client that
	// gives up on a black-holed dial after its own connect timeout is not counted.
	prematureAge = time.Second
	// maxNoopFrames bounds consecutive frames that move no stream forward (empty DATA without
	// END_STREAM, PRIORITY, unknown types, RST_STREAM or WINDOW_UPDATE for a stream that is
	// gone, unsolicited PING and SETTINGS acks). Any frame carrying headers or data resets the
	// count; a legitimate peer sends a few such frames in a row at most.
	maxNoopFrames = 10000
)

// wasteBudget counts the streams a peer opened and those it wasted: refused, reset by the peer
// before their answer, or ended by the peer's stream error. Guarded by the connection's mu.
type wasteBudget struct {
	opened, wasted int
}

// open counts a stream the peer opened.
func (b *wasteBudget) open() {
	b.opened++
	if b.opened >= wasteWindow {
		b.opened, b.wasted = b.opened/2, b.wasted/2
	}
}

// waste counts a wasted stream and reports whether the peer is now past its budget: more than
// wasteFloor streams wasted, and more than half of those it opened.
func (b *wasteBudget) waste() bool {
	b.wasted++
	return b.wasted > wasteFloor && 2*b.wasted > b.opened
}
