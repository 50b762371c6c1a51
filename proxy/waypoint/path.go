package waypoint

import "strings"

// normalizePath canonicalizes an escaped request path the way Istio's waypoint (Envoy with
// normalize_path, Istio's BASE normalization) does before any policy looks at it: backslashes
// become slashes, percent-encoded unreserved characters are decoded (other escapes are kept,
// with upper-case hex, so %2F stays %2F), and "." and ".." segments are removed (RFC 3986
// 5.2.4). Duplicate slashes are kept. The normalized path is also what is forwarded, so a policy
// never judges one path while the application serves another. ok is false for a path that is
// not absolute or holds a broken escape: such a request is refused.
func normalizePath(p string) (string, bool) {
	if !strings.HasPrefix(p, "/") && !strings.HasPrefix(p, `\`) {
		return "", false
	}
	var b strings.Builder
	b.Grow(len(p))
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '\\':
			b.WriteByte('/')
		case c == '%':
			if i+2 >= len(p) || !isHex(p[i+1]) || !isHex(p[i+2]) {
				return "", false
			}
			v := unhex(p[i+1])<<4 | unhex(p[i+2])
			if isUnreserved(v) {
				b.WriteByte(v)
			} else {
				b.WriteByte('%')
				b.WriteByte(upperHex[v>>4])
				b.WriteByte(upperHex[v&15])
			}
			i += 2
		case c < 0x21 || c == 0x7f:
			return "", false // control characters and spaces never reach a policy
		default:
			b.WriteByte(c)
		}
	}
	return removeDotSegments(b.String()), true
}

// removeDotSegments applies RFC 3986 5.2.4 to an absolute path, segment by segment.
func removeDotSegments(p string) string {
	if !strings.Contains(p, ".") {
		return p
	}
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, s)
		}
	}
	return "/" + strings.Join(out, "/")
}

const upperHex = "0123456789ABCDEF"

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

func isUnreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}
