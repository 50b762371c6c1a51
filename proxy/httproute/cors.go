package httproute

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

// CORSAction is a compiled CORS filter (the Gateway API's HTTPCORSFilter): a preflight (OPTIONS
// with Origin and Access-Control-Request-Method) is answered by the waypoint, never forwarded;
// a request from an allowed Origin gets the CORS response headers on its response. A preflight
// from an Origin not allowed is answered without them, as the spec allows, so the browser
// refuses the cross-origin request.
type CORSAction struct {
	origins     []origin
	anyOrigin   bool
	credentials bool
	methods     string // joined; "" none given
	anyMethod   bool
	headers     string
	anyHeader   bool
	expose      string
	maxAge      string
}

// origin is an allowed Origin: scheme, host (or a "*.suffix" / "*" pattern) and port.
type origin struct {
	scheme, host, port string
}

func compileCORS(c *CORS) (*CORSAction, error) {
	a := &CORSAction{credentials: c.AllowCredentials != nil && *c.AllowCredentials, maxAge: "5"}
	for _, o := range c.AllowOrigins {
		if o == "*" {
			a.anyOrigin = true
			continue
		}
		p, err := parseOrigin(o)
		if err != nil {
			return nil, fmt.Errorf("cors: allowOrigins %q: %w", o, err)
		}
		a.origins = append(a.origins, p)
	}
	a.anyMethod = slices.Contains(c.AllowMethods, "*")
	a.methods = strings.Join(c.AllowMethods, ",")
	a.anyHeader = slices.Contains(c.AllowHeaders, "*")
	a.headers = strings.Join(c.AllowHeaders, ",")
	a.expose = strings.Join(c.ExposeHeaders, ",")
	if c.MaxAge != nil {
		if *c.MaxAge < 1 {
			return nil, fmt.Errorf("cors: maxAge %d: want at least 1 second", *c.MaxAge)
		}
		a.maxAge = strconv.Itoa(int(*c.MaxAge))
	}
	return a, nil
}

// parseOrigin reads scheme://host[:port] (http or https; the port defaults to the scheme's).
func parseOrigin(s string) (origin, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "" || u.RawQuery != "" || u.User != nil {
		return origin{}, fmt.Errorf("not scheme://host[:port] with scheme http or https")
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	return origin{scheme: u.Scheme, host: strings.ToLower(u.Hostname()), port: port}, nil
}

// allowed reports whether the request's Origin header value is allowed.
func (a *CORSAction) allowed(o string) bool {
	if o == "" {
		return false
	}
	if a.anyOrigin {
		return true
	}
	got, err := parseOrigin(o)
	if err != nil {
		return false
	}
	for _, p := range a.origins {
		if p.scheme != got.scheme || p.port != got.port {
			continue
		}
		switch {
		case p.host == "*", p.host == got.host:
			return true
		case strings.HasPrefix(p.host, "*") && strings.HasSuffix(got.host, p.host[1:]) && len(got.host) > len(p.host)-1:
			return true // "*" is greedy to the left: any number of labels
		}
	}
	return false
}

// Preflight reports whether r is a CORS preflight, which the waypoint answers itself.
func (a *CORSAction) Preflight(r *http.Request) bool {
	return a != nil && r.Method == http.MethodOptions && r.Header.Get("Origin") != "" && r.Header.Get("Access-Control-Request-Method") != ""
}

// Answer writes the response to a preflight: 200, with the CORS headers when its Origin is allowed.
func (a *CORSAction) Answer(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Add("Vary", "Origin")
	if o := r.Header.Get("Origin"); a.allowed(o) {
		h.Set("Access-Control-Allow-Origin", o)
		if a.credentials {
			h.Set("Access-Control-Allow-Credentials", "true")
		}
		if m := r.Header.Get("Access-Control-Request-Method"); m != "" && (a.methods != "" || a.anyMethod) {
			if a.anyMethod { // echoing is right with and without credentials
				h.Set("Access-Control-Allow-Methods", m)
			} else {
				h.Set("Access-Control-Allow-Methods", a.methods)
			}
		}
		if rh := r.Header.Values("Access-Control-Request-Headers"); len(rh) > 0 && (a.headers != "" || a.anyHeader) {
			if a.anyHeader {
				h.Set("Access-Control-Allow-Headers", strings.Join(rh, ","))
			} else {
				h.Set("Access-Control-Allow-Headers", a.headers)
			}
		}
		h.Set("Access-Control-Max-Age", a.maxAge)
	}
	w.WriteHeader(http.StatusOK)
}

// Apply sets the CORS headers of a response to a request from origin (nil a, or an origin not
// allowed: nothing). The upstream's own CORS headers are replaced, as Envoy's CORS filter does.
func (a *CORSAction) Apply(h http.Header, origin string) {
	if a == nil || !a.allowed(origin) {
		return
	}
	h.Set("Access-Control-Allow-Origin", origin)
	if a.credentials {
		h.Set("Access-Control-Allow-Credentials", "true")
	}
	if a.expose != "" {
		h.Set("Access-Control-Expose-Headers", a.expose)
	}
	h.Add("Vary", "Origin")
}
