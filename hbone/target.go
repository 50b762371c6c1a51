package hbone

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// maxHostLen is the longest DNS name (RFC 1035 section 2.3.4).
const maxHostLen = 253

// Target is where a CONNECT goes: an IP address and port (ztunnel to a waypoint, a waypoint to a
// pod), or a host name and port (the outer CONNECT of double HBONE).
type Target struct {
	Addr netip.AddrPort // valid when the authority is an IP literal
	Host string         // set when the authority is a host name; lower case
	Port uint16
}

// IsAddr reports whether the target is an IP address.
func (t Target) IsAddr() bool { return t.Addr.IsValid() }

// String is the authority form: "10.0.0.1:80", "[fd00::1]:80" or "name.ns.svc.cluster.local:80".
func (t Target) String() string {
	if t.Addr.IsValid() {
		return t.Addr.String()
	}
	return t.Host + ":" + strconv.Itoa(int(t.Port))
}

// ParseTarget parses a CONNECT :authority. It accepts exactly host:port with host an IPv4 literal,
// a bracketed IPv6 literal without zone, or a DNS name, and port 1-65535 in plain decimal.
// Anything else (user info, paths, zones, empty or zero ports, stray characters) is rejected.
func ParseTarget(authority string) (Target, error) {
	i := strings.LastIndexByte(authority, ':')
	if i < 0 {
		return Target{}, fmt.Errorf("%w %q: missing port", ErrBadAuthority, authority)
	}
	host, portStr := authority[:i], authority[i+1:]
	port, err := parsePort(portStr)
	if err != nil {
		return Target{}, fmt.Errorf("%w %q: %v", ErrBadAuthority, authority, err)
	}
	if strings.HasPrefix(host, "[") {
		if !strings.HasSuffix(host, "]") {
			return Target{}, fmt.Errorf("%w %q: unterminated IPv6 literal", ErrBadAuthority, authority)
		}
		ip, err := netip.ParseAddr(host[1 : len(host)-1])
		if err != nil || !ip.Is6() || ip.Zone() != "" || ip.Is4In6() {
			return Target{}, fmt.Errorf("%w %q: bad IPv6 literal", ErrBadAuthority, authority)
		}
		return Target{Addr: netip.AddrPortFrom(ip, port), Port: port}, nil
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if !ip.Is4() {
			return Target{}, fmt.Errorf("%w %q: IPv6 literal needs brackets", ErrBadAuthority, authority)
		}
		return Target{Addr: netip.AddrPortFrom(ip, port), Port: port}, nil
	}
	if err := checkHostname(host); err != nil {
		return Target{}, fmt.Errorf("%w %q: %v", ErrBadAuthority, authority, err)
	}
	return Target{Host: strings.ToLower(host), Port: port}, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 || s[0] == '0' {
		return 0, fmt.Errorf("bad port %q", s)
	}
	n := 0
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("bad port %q", s)
		}
		n = n*10 + int(c-'0')
	}
	if n > 65535 {
		return 0, fmt.Errorf("bad port %q", s)
	}
	return uint16(n), nil
}

// checkHostname accepts RFC 1123 host names: dot-separated labels of letters, digits and inner
// hyphens, 1-63 characters each, 253 in all, and a trailing dot.
func checkHostname(h string) error {
	h = strings.TrimSuffix(h, ".")
	if h == "" || len(h) > maxHostLen {
		return fmt.Errorf("bad host name length %d", len(h))
	}
	if i := strings.LastIndexByte(h, '.'); strings.Trim(h[i+1:], "0123456789") == "" {
		return fmt.Errorf("numeric top-level label in %q", h)
	}
	for label := range strings.SplitSeq(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("bad host name label %q", label)
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("bad character %q in host name", c)
			}
		}
	}
	return nil
}
