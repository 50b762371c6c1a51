package extauthz

import (
	"bytes"
	"io"
	"net/http"
	"strings"
)

// matcher is istiod's translation of a header list (extauthz.go generateHeaders): "prefix*",
// "*suffix" or an exact name, compared case-insensitively. Empty matches nothing.
type matcher []string

func newMatcher(names []string) matcher {
	m := make(matcher, 0, len(names))
	for _, n := range names {
		m = append(m, strings.ToLower(n))
	}
	return m
}

func (m matcher) match(name string) bool {
	name = strings.ToLower(name)
	for _, p := range m {
		switch {
		case strings.HasPrefix(p, "*"):
			if strings.HasSuffix(name, p[1:]) {
				return true
			}
		case strings.HasSuffix(p, "*"):
			if strings.HasPrefix(name, p[:len(p)-1]) {
				return true
			}
		case p == name:
			return true
		}
	}
	return false
}

// pick copies the headers of h that keep says to keep.
func pick(h http.Header, keep func(string) bool) http.Header {
	var out http.Header
	for k, vs := range h {
		if keep(k) {
			if out == nil {
				out = http.Header{}
			}
			out[k] = append([]string(nil), vs...)
		}
	}
	return out
}

// hopByHop headers never pass between the provider's answer and the client or upstream.
var hopByHop = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Connection": true, "Transfer-Encoding": true,
	"Te": true, "Trailer": true, "Upgrade": true,
}

// readBody buffers the request body for the check when includeRequestBodyInCheck asks, as
// Envoy's ext_authz with_request_body: at most maxRequestBytes; beyond that the first
// maxRequestBytes with allowPartialMessage, else tooLarge (Envoy answers 413). The request's
// body is replaced by one that replays the buffered bytes, then the rest.
func (c *Checker) readBody(r *http.Request) (body []byte, tooLarge bool, err error) {
	if c.body == nil || r == nil || r.Body == nil || r.Body == http.NoBody {
		return nil, false, nil
	}
	limit := int64(c.body.GetMaxRequestBytes())
	buf, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	r.Body = &replayBody{Reader: io.MultiReader(bytes.NewReader(buf), r.Body), Closer: r.Body}
	if err != nil {
		return nil, false, err
	}
	if int64(len(buf)) > limit {
		if !c.body.GetAllowPartialMessage() {
			return nil, true, nil
		}
		buf = buf[:limit]
	}
	return buf, false, nil
}

type replayBody struct {
	io.Reader
	io.Closer
}
