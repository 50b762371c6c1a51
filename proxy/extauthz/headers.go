package extauthz

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/net/http/httpguts"
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

// PartialBodyHeader tells the provider whether the body it was sent is the request's whole body
// ("false") or its first maxRequestBytes ("true", allowPartialMessage), as Envoy adds it to the
// check (CheckRequestUtils::setHttpRequest) whenever it buffered the body; the client's own copy
// is never passed on.
const PartialBodyHeader = "X-Envoy-Auth-Partial-Body"

// body is the request body buffered for a check.
type body struct {
	data    []byte // at most maxRequestBytes
	partial bool   // the request's body goes on past data (allowPartialMessage)
}

// readBody buffers the request body for the check when includeRequestBodyInCheck asks, as
// Envoy's ext_authz with_request_body (filters/http/ext_authz/ext_authz.cc decodeHeaders,
// decodeData): nothing for a request without a body or an upgrade (WebSocket, CONNECT); at
// most maxRequestBytes (and one byte more, to tell a longer body); a longer body is sent cut to
// maxRequestBytes with allowPartialMessage, else refused with 413 as Envoy's connection manager
// refuses a body over its buffer limit (a Content-Length over it without reading a byte). The
// read ends at the provider's timeout (r.SetReadDeadline): a body that does not arrive by then
// is answered 408, one that cannot be read 400; neither is the provider's failure, so failOpen
// does not apply. The request's body is replaced by one that replays the buffered bytes, then
// the rest, so it reaches the upstream whole. A nil body and nil refusal: nothing to send.
func (c *Checker) readBody(r *Request) (*body, *Result) {
	hr := r.HTTP
	if c.body == nil || hr == nil || hr.Body == nil || hr.Body == http.NoBody || upgrade(hr) {
		return nil, nil
	}
	limit := int64(c.body.GetMaxRequestBytes())
	if hr.ContentLength > limit && !c.body.GetAllowPartialMessage() {
		return nil, tooLarge()
	}
	if r.SetReadDeadline != nil {
		r.SetReadDeadline(time.Now().Add(c.timeout))
		defer r.SetReadDeadline(time.Time{})
	}
	buf, err := io.ReadAll(io.LimitReader(hr.Body, limit+1))
	hr.Body = &replayBody{Reader: io.MultiReader(bytes.NewReader(buf), hr.Body), Closer: hr.Body}
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil, &Result{Status: http.StatusRequestTimeout, Body: []byte("stream timeout"), Local: true,
			Err: fmt.Errorf("extauthz: reading the request body for the check: not all there within %s: %w", c.timeout, err)}
	case err != nil:
		return nil, &Result{Status: http.StatusBadRequest, Body: []byte("Bad Request"), Local: true,
			Err: fmt.Errorf("extauthz: reading the request body for the check: %w", err)}
	}
	b := &body{data: buf}
	if int64(len(buf)) > limit {
		if !c.body.GetAllowPartialMessage() {
			return nil, tooLarge()
		}
		b.data, b.partial = buf[:limit], true
	}
	return b, nil
}

// tooLarge is Envoy's answer to a body over its buffer limit (request_payload_too_large).
func tooLarge() *Result {
	return &Result{Status: http.StatusRequestEntityTooLarge, Body: []byte("Payload Too Large"), Local: true}
}

// upgrade: a request whose body is a stream of its own, which Envoy never buffers for a check
// (Http::Utility::isWebSocketUpgradeRequest, isH2UpgradeRequest).
func upgrade(r *http.Request) bool {
	if r.Method == http.MethodConnect {
		return true
	}
	return strings.EqualFold(r.Header.Get("Upgrade"), "websocket") && httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade")
}

// partialValue is PartialBodyHeader's value for b.
func (b *body) partialValue() string {
	return strconv.FormatBool(b.partial)
}

// validUTF8 is s with each byte that is not part of valid UTF-8 replaced by '!', as Envoy
// sanitizes what it puts in a CheckRequest's string fields (MessageUtil::sanitizeUtf8String):
// protobuf strings must be UTF-8.
func validUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	b := []byte(s)
	for i := 0; i < len(b); {
		r, n := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && n == 1 {
			b[i] = '!'
		}
		i += n
	}
	return string(b)
}

type replayBody struct {
	io.Reader
	io.Closer
}
