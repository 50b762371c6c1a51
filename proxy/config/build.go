package config

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/identity/istioca"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

// Routes builds the route table of the static discovery.
func (c *Config) Routes() (*route.Table, error) {
	var services []*route.Service
	if c.Discovery.Static == nil {
		return route.NewTable(nil)
	}
	for _, s := range c.Discovery.Static.Services {
		rs := &route.Service{Name: s.Name, Namespace: s.Namespace, Hostname: s.Hostname}
		for _, v := range s.VIPs {
			rs.VIPs = append(rs.VIPs, netip.MustParseAddr(v)) // validated by Decode
		}
		for _, p := range s.Ports {
			rs.Ports = append(rs.Ports, route.Port{Name: p.Name, Port: p.Port, TargetPort: p.TargetPort, AppProtocol: p.AppProtocol})
		}
		for _, e := range s.Endpoints {
			ip := netip.MustParseAddr(e.IP)
			name := e.Workload
			if name == "" {
				name = s.Name
			}
			rs.Endpoints = append(rs.Endpoints, route.Endpoint{IP: ip, Ready: !e.NotReady, ServiceAccount: e.ServiceAccount,
				Workload: route.NewWorkload(name, s.Namespace, e.ServiceAccount, e.Labels, ip)})
		}
		services = append(services, rs)
	}
	return route.NewTable(services)
}

// Authz builds the AuthorizationPolicy engine of the static discovery.
func (c *Config) Authz() *authz.Engine {
	var ps []*authz.Policy
	var static []Policy
	if c.Discovery.Static != nil {
		static = c.Discovery.Static.Policies
	}
	for _, p := range static {
		ps = append(ps, &authz.Policy{Namespace: p.Namespace, Name: p.Name, Spec: p.Spec, DryRun: authz.DryRun(p.Annotations)})
	}
	return authz.New(authz.Waypoint{Namespace: c.Waypoint.Namespace, Gateway: c.Waypoint.Gateway, RootNamespace: c.Waypoint.RootNamespace}, ps)
}

// IdentitySource builds the identity source and the function that keeps it current (it blocks
// until ctx ends; nil for a static one).
func (c *Config) IdentitySource(log *slog.Logger) (identity.Source, func(context.Context) error, error) {
	id := c.Identity
	switch id.Source {
	case "devca":
		ca, err := devca.Load(id.DevCA.Dir)
		if err != nil {
			return nil, nil, err
		}
		svid, err := ca.Issue(id.DevCA.ID, time.Time{}, time.Time{})
		if err != nil {
			return nil, nil, err
		}
		return identity.Static(&identity.Identity{SVID: svid, Bundle: ca.Bundle()}), nil, nil
	case "files":
		f := &identity.Files{CertFile: id.Files.Cert, KeyFile: id.Files.Key, BundleFile: id.Files.Bundle, Logger: log}
		if _, err := f.Fetch(); err != nil {
			return nil, nil, err
		}
		return f, f.Run, nil
	case "istio-ca":
		ic := id.IstioCA
		s := &identity.IstioCA{
			Client: &istioca.Client{Addr: ic.Addr, ClusterID: ic.ClusterID, Token: func(context.Context) (string, error) {
				b, err := os.ReadFile(ic.TokenFile)
				if err != nil {
					return "", fmt.Errorf("reading the service-account token %s: %w", ic.TokenFile, err)
				}
				return strings.TrimSpace(string(b)), nil
			}},
			RootCertFile: ic.RootCertFile,
			TrustDomain:  ic.TrustDomain,
			TTL:          ic.TTL.Duration,
			Logger:       log,
		}
		return s, s.Run, nil
	case "workload-api":
		w := &identity.WorkloadAPI{Addr: id.WorkloadAPI.Addr, Logger: log}
		return w, w.Run, nil
	}
	return nil, nil, fmt.Errorf("config: identity.source %q", id.Source)
}
