package hbone

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// maxForwardedLen bounds the Forwarded header we parse; ztunnel sends one short element.
const maxForwardedLen = 4096

// ForwardedElement is one element of a Forwarded header (RFC 7239): a hop's parameters.
type ForwardedElement struct {
	For   string // node: "192.0.2.1", "192.0.2.1:8080", "[2001:db8::1]:80", "unknown", "_hidden"
	By    string
	Host  string
	Proto string
}

// ForAddr parses For as an IP address with an optional port.
func (e ForwardedElement) ForAddr() (netip.AddrPort, bool) {
	if ap, err := netip.ParseAddrPort(e.For); err == nil {
		return ap, true
	}
	s := strings.TrimSuffix(strings.TrimPrefix(e.For, "["), "]")
	if ip, err := netip.ParseAddr(s); err == nil && ip.Zone() == "" {
		return netip.AddrPortFrom(ip, 0), true
	}
	return netip.AddrPort{}, false
}

// String renders the element as RFC 7239 text, quoting values that need it.
func (e ForwardedElement) String() string {
	var parts []string
	for _, kv := range [][2]string{{"for", e.For}, {"by", e.By}, {"host", e.Host}, {"proto", e.Proto}} {
		if kv[1] != "" {
			parts = append(parts, kv[0]+"="+quoteIfNeeded(kv[1]))
		}
	}
	return strings.Join(parts, ";")
}

// FormatForwarded renders elements as one Forwarded header value.
func FormatForwarded(els ...ForwardedElement) string {
	s := make([]string, len(els))
	for i, e := range els {
		s[i] = e.String()
	}
	return strings.Join(s, ", ")
}

var errForwarded = errors.New("hbone: malformed Forwarded header")

// ParseForwarded parses a Forwarded header value into its elements. Unknown parameters and empty
// values are ignored (an element left with nothing is dropped); a parameter repeated within one element, bad syntax, or a value over 4 KiB is an error.
func ParseForwarded(v string) ([]ForwardedElement, error) {
	if len(v) > maxForwardedLen {
		return nil, fmt.Errorf("%w: %d bytes", errForwarded, len(v))
	}
	var els []ForwardedElement
	p := fwdParser{s: v}
	for {
		p.skipSpace()
		if p.done() {
			break
		}
		e, err := p.element()
		if err != nil {
			return nil, err
		}
		if e != (ForwardedElement{}) {
			els = append(els, e) // an element with nothing we know carries nothing
		}
		p.skipSpace()
		if p.done() {
			break
		}
		if !p.eat(',') {
			return nil, fmt.Errorf("%w: expected ',' at %d", errForwarded, p.i)
		}
	}
	return els, nil
}

type fwdParser struct {
	s string
	i int
}

func (p *fwdParser) done() bool { return p.i >= len(p.s) }

func (p *fwdParser) eat(c byte) bool {
	if p.i < len(p.s) && p.s[p.i] == c {
		p.i++
		return true
	}
	return false
}

func (p *fwdParser) skipSpace() {
	for p.i < len(p.s) && (p.s[p.i] == ' ' || p.s[p.i] == '\t') {
		p.i++
	}
}

func (p *fwdParser) element() (ForwardedElement, error) {
	var e ForwardedElement
	seen := map[string]bool{}
	for {
		p.skipSpace()
		name := strings.ToLower(p.token())
		if name == "" || !p.eat('=') {
			return e, fmt.Errorf("%w: expected name=value at %d", errForwarded, p.i)
		}
		val, err := p.value()
		if err != nil {
			return e, err
		}
		if seen[name] {
			return e, fmt.Errorf("%w: repeated %q", errForwarded, name)
		}
		seen[name] = true
		switch name {
		case "for":
			e.For = val
		case "by":
			e.By = val
		case "host":
			e.Host = val
		case "proto":
			e.Proto = val
		}
		p.skipSpace()
		if !p.eat(';') {
			return e, nil
		}
	}
}

func (p *fwdParser) token() string {
	start := p.i
	for p.i < len(p.s) && isTokenChar(p.s[p.i]) {
		p.i++
	}
	return p.s[start:p.i]
}

func (p *fwdParser) value() (string, error) {
	if !p.eat('"') {
		if t := p.token(); t != "" {
			return t, nil
		}
		return "", fmt.Errorf("%w: empty value at %d", errForwarded, p.i)
	}
	var b strings.Builder
	for p.i < len(p.s) {
		c := p.s[p.i]
		p.i++
		if c == '\\' && p.i < len(p.s) {
			c = p.s[p.i] // quoted-pair: the escaped byte must still be HTAB, SP or visible
			p.i++
		} else if c == '"' {
			return b.String(), nil
		}
		if c < 0x20 && c != '\t' || c == 0x7f {
			return "", fmt.Errorf("%w: control character in quoted value", errForwarded)
		}
		b.WriteByte(c)
	}
	return "", fmt.Errorf("%w: unterminated quoted value", errForwarded)
}

// isTokenChar reports RFC 9110 tchar.
func isTokenChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// quoteEscaper is built once: a Replacer builds its tables on first use (about 10 KB, once per
// stream when it was made per call; issue 21).
var quoteEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`)

func quoteIfNeeded(v string) string {
	for i := 0; i < len(v); i++ {
		if !isTokenChar(v[i]) {
			return `"` + quoteEscaper.Replace(v) + `"`
		}
	}
	return v
}
