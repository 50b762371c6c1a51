package hbone

import "time"

// Defaults match ztunnel, so detour behaves like the rest of the mesh on the wire.
// Sources (istio/ztunnel): src/config.rs (DEFAULT_* window, frame and pool constants) and
// src/proxy/h2/{client,server}.rs (the h2 builder settings and keepalive).
const (
	// DefaultStreamWindow is the initial HTTP/2 stream flow-control window (ztunnel: 4 MiB).
	DefaultStreamWindow = 4 << 20
	// DefaultConnWindow is the connection window. ztunnel keeps it larger than the stream window so
	// that one stalled stream cannot block the connection (16 MiB).
	DefaultConnWindow = 16 << 20
	// DefaultConnBuffer bounds the unread bytes per connection whose connection window is returned
	// when they arrive rather than when they are read, so that a stream whose reader stalls holds
	// only its own stream window, not the connection's; past it, window is returned on read again.
	// A connection thus buffers at most ConnWindow + ConnBuffer unread bytes (16 + 16 MiB).
	DefaultConnBuffer = 16 << 20
	// DefaultMaxFrameSize is the largest DATA frame payload we accept (ztunnel: 1 MiB).
	DefaultMaxFrameSize = 1 << 20
	// DefaultMaxConcurrentStreams caps open streams per connection. ztunnel's pool uses at most 100
	// streams per connection before opening another one.
	DefaultMaxConcurrentStreams = 100
	// DefaultServerMaxConcurrentStreams is what the server advertises; a pool client opens more
	// connections past its own limit, so the server may allow more.
	DefaultServerMaxConcurrentStreams = 1000
	// DefaultMaxHeaderListSize bounds a decoded header block: ztunnel's server allows 64 KiB
	// (src/proxy/h2/server.rs), its client 16 KiB (src/proxy/h2/client.rs).
	DefaultMaxHeaderListSize       = 16 << 10
	DefaultServerMaxHeaderListSize = 64 << 10
	// DefaultPingInterval and DefaultPingTimeout: ztunnel pings an idle connection every 10 s and
	// drops it when no answer arrives within 20 s.
	DefaultPingInterval = 10 * time.Second
	DefaultPingTimeout  = 20 * time.Second
	// DefaultHandshakeTimeout bounds the TLS handshake plus the HTTP/2 preface.
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultIdleTimeout closes a server connection that carried no stream for this long.
	DefaultIdleTimeout = 10 * time.Minute
	// DefaultPoolIdleTimeout releases an unused pooled client connection
	// (ztunnel: DEFAULT_POOL_UNUSED_RELEASE_TIMEOUT, 5 min).
	DefaultPoolIdleTimeout = 5 * time.Minute
	// DefaultHalfCloseTimeout bounds how long the remaining direction of a spliced stream may stay
	// silent after the other direction ended.
	DefaultHalfCloseTimeout = 5 * time.Minute
)

// Config holds the HTTP/2 settings of one side of HBONE. The zero value means every default above.
type Config struct {
	StreamWindow         uint32        // default DefaultStreamWindow
	ConnWindow           uint32        // default DefaultConnWindow
	ConnBuffer           uint32        // default DefaultConnBuffer: unread bytes whose connection window returns on arrival
	MaxFrameSize         uint32        // default DefaultMaxFrameSize
	MaxConcurrentStreams uint32        // default: 100 on a Dialer, 1000 on a Server
	MaxHeaderListSize    uint32        // default: 16 KiB on a Dialer, 64 KiB on a Server
	PingInterval         time.Duration // default DefaultPingInterval; negative disables pings
	PingTimeout          time.Duration // default DefaultPingTimeout
	HandshakeTimeout     time.Duration // default DefaultHandshakeTimeout
	IdleTimeout          time.Duration // default: 5 min on a Dialer, 10 min on a Server; negative disables
}

// withDefaults returns c with every zero field set to its default for a server or a client.
func (c Config) withDefaults(server bool) Config {
	setU32(&c.StreamWindow, DefaultStreamWindow)
	setU32(&c.ConnWindow, DefaultConnWindow)
	setU32(&c.ConnBuffer, DefaultConnBuffer)
	setU32(&c.MaxFrameSize, DefaultMaxFrameSize)
	if server {
		setU32(&c.MaxConcurrentStreams, DefaultServerMaxConcurrentStreams)
		setU32(&c.MaxHeaderListSize, DefaultServerMaxHeaderListSize)
		setDur(&c.IdleTimeout, DefaultIdleTimeout)
	} else {
		setU32(&c.MaxConcurrentStreams, DefaultMaxConcurrentStreams)
		setU32(&c.MaxHeaderListSize, DefaultMaxHeaderListSize)
		setDur(&c.IdleTimeout, DefaultPoolIdleTimeout)
	}
	setDur(&c.PingInterval, DefaultPingInterval)
	setDur(&c.PingTimeout, DefaultPingTimeout)
	setDur(&c.HandshakeTimeout, DefaultHandshakeTimeout)
	c.MaxFrameSize = min(max(c.MaxFrameSize, 1<<14), 1<<24-1)
	c.StreamWindow = min(c.StreamWindow, 1<<31-1)
	c.ConnWindow = min(max(c.ConnWindow, 65535), 1<<31-1)
	return c
}

func setU32(v *uint32, d uint32) {
	if *v == 0 {
		*v = d
	}
}

func setDur(v *time.Duration, d time.Duration) {
	if *v == 0 {
		*v = d
	}
}
