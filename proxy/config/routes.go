package config

import (
	"errors"
	"fmt"

	"go.yaml.in/yaml/v3"

	"github.com/detour-mesh/detour/proxy/httproute"
	"github.com/detour-mesh/detour/proxy/l4route"
)

// HTTPRoutes compiles the static discovery's HTTPRoutes and GRPCRoutes against its services.
func (c *Config) HTTPRoutes() (*httproute.Table, error) {
	table, err := c.Routes()
	if err != nil {
		return nil, err
	}
	var hrs []*httproute.HTTPRoute
	var grs []*httproute.GRPCRoute
	if s := c.Discovery.Static; s != nil {
		for i := range s.HTTPRoutes {
			hrs = append(hrs, &s.HTTPRoutes[i])
		}
		for i := range s.GRPCRoutes {
			grs = append(grs, &s.GRPCRoutes[i])
		}
	}
	t, err := httproute.Compile(table, c.Waypoint.Namespace, hrs, grs)
	if err != nil {
		return nil, err
	}
	return t, outOfScope(c.Waypoint.Namespace, t.OutOfScope())
}

// L4Routes compiles the static discovery's TCPRoutes and TLSRoutes against its services.
func (c *Config) L4Routes() (*l4route.Table, error) {
	table, err := c.Routes()
	if err != nil {
		return nil, err
	}
	var tcps []*l4route.TCPRoute
	var tlss []*l4route.TLSRoute
	if s := c.Discovery.Static; s != nil {
		for i := range s.TCPRoutes {
			tcps = append(tcps, &s.TCPRoutes[i])
		}
		for i := range s.TLSRoutes {
			tlss = append(tlss, &s.TLSRoutes[i])
		}
	}
	t, err := l4route.Compile(table, c.Waypoint.Namespace, tcps, tlss)
	if err != nil {
		return nil, err
	}
	return t, outOfScope(c.Waypoint.Namespace, t.OutOfScope())
}

// outOfScope refuses static routes the waypoint would not apply because of their namespace
// (httproute.Scope): a document never says more than detour does.
func outOfScope(waypointNS string, routes []httproute.OutOfScope) error {
	var errs []error
	for _, r := range routes {
		errs = append(errs, fmt.Errorf("discovery.static: %s: the route is in neither the service's namespace nor the waypoint's (%s), so the waypoint does not apply it, as Istio's does not (a consumer route; move it to one of those namespaces)", r, waypointNS))
	}
	return errors.Join(errs...)
}

// checkRoutes names the YAML line of a field discovery.static.httpRoutes[], grpcRoutes[],
// tcpRoutes[] or tlsRoutes[] do not have (the strict decoder refuses it too, without a line).
func checkRoutes(doc []byte) error {
	var root yaml.Node
	if err := yaml.Unmarshal(doc, &root); err != nil || len(root.Content) == 0 {
		return nil
	}
	static := lookup(lookup(root.Content[0], "discovery"), "static")
	for _, kind := range []string{"httpRoutes", "grpcRoutes", "tcpRoutes", "tlsRoutes"} {
		list := lookup(static, kind)
		if list == nil || list.Kind != yaml.SequenceNode {
			continue
		}
		for i, r := range list.Content {
			path := fmt.Sprintf("discovery.static.%s[%d]", kind, i)
			var err error
			switch kind {
			case "httpRoutes", "grpcRoutes":
				err = httproute.CheckYAML(r, kind == "grpcRoutes", path)
			default:
				err = l4route.CheckYAML(r, kind == "tlsRoutes", path)
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}
