package hbone

import (
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2/hpack"
)

// Header names HBONE carries (ztunnel src/proxy/outbound.rs, create_hbone_request).
const (
	HeaderForwarded   = "forwarded"
	HeaderBaggage     = "baggage"
	HeaderTraceparent = "traceparent"
)

// Request is what a CONNECT says, on either side: the target, the propagated headers, and on the
// server the peer identity and the connection's addresses.
type Request struct {
	Target      Target
	Forwarded   string      // raw Forwarded header (RFC 7239); see ParseForwarded
	Baggage     string      // raw W3C baggage
	Traceparent string      // raw W3C traceparent
	Header      http.Header // every other regular header, canonical keys; nil when there is none

	// Set by the server only.
	PeerID     spiffeid.ID // from the verified client certificate's URI SAN; zero if none
	LocalAddr  net.Addr
	RemoteAddr net.Addr
}

// OriginalSource is the address in the first Forwarded element's for= parameter, the original
// client of the stream as ztunnel reports it; ok is false if there is none.
func (r *Request) OriginalSource() (netip.AddrPort, bool) {
	els, err := ParseForwarded(r.Forwarded)
	if err != nil || len(els) == 0 {
		return netip.AddrPort{}, false
	}
	return els[0].ForAddr()
}

// fields returns the HPACK fields of a CONNECT for r, pseudo-headers first.
func (r *Request) fields() []hpack.HeaderField {
	f := []hpack.HeaderField{{Name: ":method", Value: http.MethodConnect}, {Name: ":authority", Value: r.Target.String()}}
	add := func(name, value string) {
		if value != "" {
			f = append(f, hpack.HeaderField{Name: name, Value: value})
		}
	}
	add(HeaderForwarded, r.Forwarded)
	add(HeaderBaggage, r.Baggage)
	add(HeaderTraceparent, r.Traceparent)
	for k, vs := range r.Header {
		k = strings.ToLower(k)
		if isConnectionSpecific(k) || k == HeaderForwarded || k == HeaderBaggage || k == HeaderTraceparent {
			continue
		}
		for _, v := range vs {
			add(k, v)
		}
	}
	return f
}

// isConnectionSpecific reports headers HTTP/2 forbids (RFC 9113 section 8.2.2).
func isConnectionSpecific(k string) bool {
	switch k {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te":
		return true
	}
	return false
}

// parseRequest builds a Request from a decoded CONNECT header block. It returns the status to
// answer with when the request is not acceptable.
func parseRequest(fields []hpack.HeaderField) (*Request, int, error) {
	var method, authority string
	var extraPseudo bool
	r := &Request{}
	for _, f := range fields {
		switch f.Name {
		case ":method":
			method = f.Value
		case ":authority":
			authority = f.Value
		case ":scheme", ":path", ":protocol":
			extraPseudo = true
		case HeaderForwarded:
			r.Forwarded = joinHeader(r.Forwarded, f.Value)
		case HeaderBaggage:
			r.Baggage = joinHeader(r.Baggage, f.Value)
		case HeaderTraceparent:
			r.Traceparent = f.Value
		default:
			if !strings.HasPrefix(f.Name, ":") {
				if r.Header == nil {
					r.Header = http.Header{}
				}
				r.Header.Add(f.Name, f.Value)
			}
		}
	}
	if method != http.MethodConnect {
		return nil, http.StatusMethodNotAllowed, fmt.Errorf("hbone: method %q is not CONNECT", method)
	}
	if extraPseudo {
		// A plain CONNECT carries only :method and :authority (RFC 9113 section 8.5).
		return nil, http.StatusBadRequest, fmt.Errorf("%w: CONNECT with :scheme, :path or :protocol", ErrBadAuthority)
	}
	t, err := ParseTarget(authority)
	if err != nil {
		return nil, http.StatusBadRequest, err
	}
	r.Target = t
	return r, http.StatusOK, nil
}

func joinHeader(a, b string) string {
	if a == "" {
		return b
	}
	return a + ", " + b
}

// peerID returns the SPIFFE ID of a verified peer certificate chain's leaf, or the zero ID.
func peerID(certs []*x509.Certificate) spiffeid.ID {
	if len(certs) == 0 {
		return spiffeid.ID{}
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return spiffeid.ID{}
	}
	return id
}
