package httproute

import (
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// HeaderMod is a compiled RequestHeaderModifier or ResponseHeaderModifier: set, then add, then
// remove, names canonical.
type HeaderMod struct {
	Set, Add []Header
	Remove   []string
}

// Apply edits h.
func (m *HeaderMod) Apply(h http.Header) {
	if m == nil {
		return
	}
	for _, s := range m.Set {
		h[s.Name] = []string{s.Value}
	}
	for _, a := range m.Add {
		h[a.Name] = append(h[a.Name], a.Value)
	}
	for _, name := range m.Remove {
		delete(h, name)
	}
}

func compileHeaderMod(m *HeaderModifier) *HeaderMod {
	if m == nil {
		return nil
	}
	out := &HeaderMod{}
	for _, s := range m.Set {
		out.Set = append(out.Set, Header{Name: http.CanonicalHeaderKey(s.Name), Value: s.Value})
	}
	for _, a := range m.Add {
		out.Add = append(out.Add, Header{Name: http.CanonicalHeaderKey(a.Name), Value: a.Value})
	}
	for _, r := range m.Remove {
		out.Remove = append(out.Remove, http.CanonicalHeaderKey(r))
	}
	return out
}

// pathRewrite is ReplaceFullPath or ReplacePrefixMatch.
type pathRewrite struct {
	full   *string
	prefix *string // without a trailing slash
}

// apply rewrites path (escaped, normalized); matched is the PathPrefix that matched (no trailing
// slash). The prefix rewrite keeps segment boundaries: /strip-prefix/three with prefix
// /strip-prefix and replacement / is /three, as in the mesh conformance tests.
func (p *pathRewrite) apply(path, matched string) string {
	switch {
	case p == nil:
		return path
	case p.full != nil:
		return *p.full
	case p.prefix != nil:
		out := *p.prefix + path[min(len(matched), len(path)):]
		if !strings.HasPrefix(out, "/") {
			out = "/" + out
		}
		return out
	}
	return path
}

// RedirectAction is a compiled RequestRedirect.
type RedirectAction struct {
	Scheme   string // "": the request's
	Hostname string // "": the request's
	Port     int    // 0: derived (see Location)
	Status   int    // 301, 302 (the default), 303, 307 or 308
	path     *pathRewrite
}

// Location is where the redirect sends r (scheme http, arrived at the service port
// servicePort); path is r's normalized escaped path, matched the PathPrefix that matched. With
// no port given, the port is the scheme's well-known one when the scheme is redirected, else
// the service port, and left out of the Location when well known (httproute_types.go,
// HTTPRequestRedirectFilter.Port).
func (a *RedirectAction) Location(r *http.Request, path, matched string, servicePort uint16) string {
	scheme := a.Scheme
	if scheme == "" {
		scheme = "http"
	}
	host := a.Hostname
	if host == "" {
		host = r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
	}
	port := a.Port
	if port == 0 && a.Scheme == "" {
		port = int(servicePort)
	}
	if port != 0 && !(scheme == "http" && port == 80) && !(scheme == "https" && port == 443) {
		host = net.JoinHostPort(host, strconv.Itoa(port))
	}
	u := url.URL{Scheme: scheme, Host: host, RawQuery: r.URL.RawQuery}
	p := a.path.apply(path, matched)
	u.Path, _ = url.PathUnescape(p)
	u.RawPath = p
	return u.String()
}

// RewriteAction is a compiled URLRewrite.
type RewriteAction struct {
	Hostname string // "": unchanged
	path     *pathRewrite
}

// Apply rewrites r's host and path; path is r's normalized escaped path, matched the PathPrefix
// that matched. It returns the new escaped path.
func (a *RewriteAction) Apply(r *http.Request, path, matched string) string {
	if a == nil {
		return path
	}
	if a.Hostname != "" {
		r.Host = a.Hostname
	}
	if a.path == nil {
		return path
	}
	p := a.path.apply(path, matched)
	if unescaped, err := url.PathUnescape(p); err == nil {
		r.URL.Path, r.URL.RawPath = unescaped, p
	}
	return p
}
