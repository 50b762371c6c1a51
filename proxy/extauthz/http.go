package extauthz

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
)

// httpProvider is the HTTP form (envoyExtAuthzHttp), as Envoy's ext_authz HTTP service: the
// check is a request with the original method, to pathPrefix + the original path, carrying the
// headers Envoy always sends (Host, Authorization, Content-Length) and those
// includeRequestHeadersInCheck selects, plus includeAdditionalHeadersInCheck. A 200 allows; any
// other status denies with that status, the body and the headers headersToDownstreamOnDeny
// selects (all but Host when it is not set; with it, also Path, Status, Content-Length,
// WWW-Authenticate and Location, as Envoy adds them).
type httpProvider struct {
	client     *http.Client
	base       string // http://host:port
	prefix     string
	include    matcher
	additional map[string]string
	upstream   matcher
	downAllow  matcher
	downDeny   matcher // nil: every header but Host
}

func newHTTP(c *Checker, p *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationHttpProvider, cfg Config) error {
	if pp := p.GetPathPrefix(); pp != "" && !strings.HasPrefix(pp, "/") {
		return fmt.Errorf("pathPrefix must begin with /, got %q", pp)
	}
	include := p.GetIncludeRequestHeadersInCheck()
	if len(include) == 0 {
		include = p.GetIncludeHeadersInCheck() //nolint:staticcheck // istiod reads the deprecated field when the new one is empty
	}
	for field, list := range map[string][]string{
		"includeRequestHeadersInCheck": include, "headersToUpstreamOnAllow": p.GetHeadersToUpstreamOnAllow(),
		"headersToDownstreamOnAllow": p.GetHeadersToDownstreamOnAllow(), "headersToDownstreamOnDeny": p.GetHeadersToDownstreamOnDeny(),
	} {
		for _, v := range list {
			if v == "*" {
				return fmt.Errorf("%s: a single wildcard (\"*\") is not supported (istiod refuses it); use a prefix or suffix", field)
			}
		}
	}
	h := &httpProvider{
		base:       "http://" + address(p.GetService(), p.GetPort()),
		prefix:     p.GetPathPrefix(),
		include:    newMatcher(include),
		additional: p.GetIncludeAdditionalHeadersInCheck(),
		upstream:   newMatcher(p.GetHeadersToUpstreamOnAllow()),
		downAllow:  newMatcher(p.GetHeadersToDownstreamOnAllow()),
	}
	if deny := p.GetHeadersToDownstreamOnDeny(); len(deny) > 0 {
		h.downDeny = newMatcher(append(deny, "path", "status", "content-length", "www-authenticate", "location"))
	}
	t := &http.Transport{
		DialContext:         cfg.dial(),
		MaxConnsPerHost:     maxConns,
		MaxIdleConnsPerHost: maxConns,
		DisableCompression:  true,
	}
	h.client = &http.Client{
		Transport:     t,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	c.check = h.check
	c.close = func() error { t.CloseIdleConnections(); return nil }
	return nil
}

func (h *httpProvider) check(ctx context.Context, r *Request, b *body) (Result, error) {
	if r.HTTP == nil {
		return Result{}, errors.New("an HTTP provider cannot check an opaque stream")
	}
	var body []byte
	if b != nil {
		body = b.data
	}
	req, err := http.NewRequestWithContext(ctx, r.HTTP.Method, h.base, bytes.NewReader(body))
	if err != nil {
		return Result{}, err
	}
	req.URL.Opaque = h.prefix + r.HTTP.URL.EscapedPath() // as the waypoint normalized it
	req.URL.RawQuery = r.HTTP.URL.RawQuery
	req.Host = r.HTTP.Host
	req.ContentLength = int64(len(body))
	for k, vs := range r.HTTP.Header {
		if k == "Authorization" || h.include.match(k) {
			if !hopByHop[k] && k != "Content-Length" && k != PartialBodyHeader {
				req.Header[k] = vs
			}
		}
	}
	for k, v := range h.additional {
		req.Header.Set(k, v)
	}
	if len(body) > 0 {
		req.Header.Set("Content-Length", strconv.Itoa(len(body)))
	}
	if b != nil {
		req.Header.Set(PartialBodyHeader, b.partialValue())
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return Result{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseBody)) // lets the connection be reused
		return Result{
			Allow:       true,
			UpstreamSet: pick(resp.Header, func(k string) bool { return !hopByHop[k] && h.upstream.match(k) }),
			Downstream:  pick(resp.Header, func(k string) bool { return !hopByHop[k] && h.downAllow.match(k) }),
		}, nil
	}
	denial, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody+1))
	if err != nil {
		return Result{}, fmt.Errorf("reading the denial: %w", err)
	}
	if len(denial) > maxResponseBody {
		return Result{}, fmt.Errorf("the denial's body is over %d bytes", maxResponseBody)
	}
	keep := func(k string) bool {
		if hopByHop[k] || k == "Content-Length" {
			return false
		}
		if h.downDeny == nil {
			return k != "Host"
		}
		return h.downDeny.match(k)
	}
	return Result{Status: resp.StatusCode, Header: pick(resp.Header, keep), Body: denial}, nil
}
