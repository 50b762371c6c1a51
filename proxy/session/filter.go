package session

import (
	"fmt"
	"net/http"
	"regexp"

	"golang.org/x/net/http/httpguts"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// MaxHeaderConditions bounds a filter's header conditions (Header and Headers together).
const MaxHeaderConditions = 8

// headerCond is one compiled header condition. Immutable.
type headerCond struct {
	name  string
	value string         // exact value; "" with re nil: present with any value
	re    *regexp.Regexp // or a regex on the value
}

// match reports whether one of h's values meets the condition (a repeated header is several
// values; one that matches is enough).
func (c headerCond) match(h http.Header) bool {
	for _, v := range h.Values(c.name) {
		switch {
		case c.re != nil:
			if c.re.MatchString(v) {
				return true
			}
		case c.value != "":
			if v == c.value {
				return true
			}
		default:
			return true
		}
	}
	return false
}

// compileHeaders checks and compiles f's header conditions: a name that is an HTTP token, a
// value or a regex (not both), a bounded regex, at most MaxHeaderConditions.
func compileHeaders(f tunnel.Filter) ([]headerCond, error) {
	all := f.HeaderMatches()
	if len(all) > MaxHeaderConditions {
		return nil, fmt.Errorf("session: %d header conditions, at most %d", len(all), MaxHeaderConditions)
	}
	conds := make([]headerCond, 0, len(all))
	for _, h := range all {
		if h.Name == "" {
			return nil, fmt.Errorf("session: a header value needs a header name")
		}
		if !httpguts.ValidHeaderFieldName(h.Name) {
			return nil, fmt.Errorf("session: header name %q is not an HTTP token", h.Name)
		}
		if h.Value != "" && h.Regex != "" {
			return nil, fmt.Errorf("session: header %s: give a header value or a header regex, not both", h.Name)
		}
		c := headerCond{name: h.Name, value: h.Value}
		if h.Regex != "" {
			re, err := compile("header", h.Regex)
			if err != nil {
				return nil, err
			}
			c.re = re
		}
		conds = append(conds, c)
	}
	return conds, nil
}

// CheckFilter reports what New would refuse in f, and a method that is not an HTTP token, without
// a session: the CLI checks a filter before it dials the waypoint.
func CheckFilter(f tunnel.Filter) error {
	if _, err := compileHeaders(f); err != nil {
		return err
	}
	if f.Path != "" {
		if _, err := compile("path", f.Path); err != nil {
			return err
		}
	}
	if f.Method != "" && !httpguts.ValidHeaderFieldName(f.Method) { // a method is a token too
		return fmt.Errorf("session: method %q is not an HTTP token", f.Method)
	}
	return nil
}

// describeHeader renders a header condition for messages.
func describeHeader(h tunnel.HeaderMatch) string {
	switch {
	case h.Value != "":
		return fmt.Sprintf("header %s=%s", h.Name, h.Value)
	case h.Regex != "":
		return fmt.Sprintf("header %s~%s", h.Name, h.Regex)
	}
	return "header " + h.Name + " present"
}
