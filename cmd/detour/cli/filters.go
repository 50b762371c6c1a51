package cli

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Everything a developer types is checked here, before any network call: a mistake costs one
// line naming the flag, never a session that silently matches nothing.

// parseHeader reads one --header: NAME=VALUE or NAME:VALUE (exact value), NAME~REGEX (RE2 on
// the value), or NAME (present). The first of = : ~ separates the name; = and : cannot be in a
// header name, ~ can but is taken as the separator.
func parseHeader(arg string) (tunnel.HeaderMatch, error) {
	i := strings.IndexAny(arg, "=:~")
	name, sep, rest := arg, byte(0), ""
	if i >= 0 {
		name, sep, rest = arg[:i], arg[i], arg[i+1:]
	}
	bad := func(format string, a ...any) (tunnel.HeaderMatch, error) {
		return tunnel.HeaderMatch{}, fmt.Errorf("--header %q: %s", arg, fmt.Sprintf(format, a...))
	}
	if name == "" {
		return bad("no header name; want NAME=VALUE, NAME:VALUE, NAME~REGEX or NAME")
	}
	if !httpguts.ValidHeaderFieldName(name) {
		return bad("%q is not a header name (letters, digits and !#$%%&'*+-.^_`|~ only)", name)
	}
	h := tunnel.HeaderMatch{Name: name}
	switch sep {
	case '=', ':':
		// HTTP drops a value's surrounding spaces; an exact value with them could never match.
		h.Value = strings.Trim(rest, " \t")
		if h.Value == "" {
			return bad("an empty value; to match any value give the name alone")
		}
		if !httpguts.ValidHeaderFieldValue(h.Value) {
			return bad("the value holds a control character")
		}
	case '~':
		if rest == "" {
			return bad("an empty regex; to match any value give the name alone")
		}
		h.Regex = rest
	}
	if err := session.CheckFilter(tunnel.Filter{}.WithHeaders([]tunnel.HeaderMatch{h})); err != nil {
		return bad("%s", strings.TrimPrefix(err.Error(), "session: "))
	}
	return h, nil
}

// parseFilter builds the filter of the --header (each must hold), --path and --method flags.
func parseFilter(headers []string, path, method string) (tunnel.Filter, error) {
	var hs []tunnel.HeaderMatch
	for _, arg := range headers {
		h, err := parseHeader(arg)
		if err != nil {
			return tunnel.Filter{}, err
		}
		hs = append(hs, h)
	}
	if len(hs) > session.MaxHeaderConditions {
		return tunnel.Filter{}, fmt.Errorf("--header: %d given, at most %d", len(hs), session.MaxHeaderConditions)
	}
	f := tunnel.Filter{Path: path, Method: strings.ToUpper(method)}.WithHeaders(hs)
	if f.Method != "" && !httpguts.ValidHeaderFieldName(f.Method) {
		return tunnel.Filter{}, fmt.Errorf("--method %q: not an HTTP method", method)
	}
	if path != "" {
		if err := session.CheckFilter(tunnel.Filter{Path: path}); err != nil {
			return tunnel.Filter{}, fmt.Errorf("--path %q: %s", path, strings.TrimPrefix(err.Error(), "session: "))
		}
	}
	return f, nil
}

// parseTo reads --to: PORT (on 127.0.0.1), :PORT (the same) or HOST:PORT.
func parseTo(to string) (string, error) {
	if to == "" {
		return "", errors.New("--to is required: where your local app listens, PORT (on 127.0.0.1) or HOST:PORT")
	}
	host, port := "", to
	if strings.Contains(to, ":") {
		var err error
		if host, port, err = net.SplitHostPort(to); err != nil {
			return "", fmt.Errorf("--to %q: want PORT or HOST:PORT", to)
		}
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return "", fmt.Errorf("--to %q: port %q is not a number from 1 to 65535", to, port)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}
