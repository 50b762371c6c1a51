package httproute

import "fmt"

// RouteError is a route Compile (this package's or proxy/l4route's) left out whole, and why:
// Err names the field ("rules[0].filters[1]: ..."). The compile error of each refused route
// wraps one (errors.As), so a caller can report the route by kind, namespace and name.
type RouteError struct {
	Kind, Namespace, Name string
	Err                   error
}

func (e *RouteError) Error() string {
	return fmt.Sprintf("%s %s/%s: %v", e.Kind, e.Namespace, e.Name, e.Err)
}

func (e *RouteError) Unwrap() error { return e.Err }
