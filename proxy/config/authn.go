package config

import (
	"fmt"
	"time"

	"go.yaml.in/yaml/v3"
	secv1beta1 "istio.io/api/security/v1beta1"

	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
)

// RequestAuthentication is a RequestAuthentication object: JWT rules for the services (or the
// waypoint's Gateway) its targetRefs name.
type RequestAuthentication struct {
	Name      string                            `json:"name"`
	Namespace string                            `json:"namespace"`
	Spec      *secv1beta1.RequestAuthentication `json:"spec"`
}

// checkRequestAuthentications refuses a field RequestAuthentication does not have in each
// discovery.static.requestAuthentications[].spec, naming it and its YAML line (see
// checkPolicies: istio.io/api's decoder would ignore it, so `jwksUrl:` would silently be a rule
// with no keys).
func checkRequestAuthentications(doc []byte) error {
	var root yaml.Node
	if err := yaml.Unmarshal(doc, &root); err != nil || len(root.Content) == 0 {
		return nil
	}
	list := lookup(lookup(lookup(root.Content[0], "discovery"), "static"), "requestAuthentications")
	if list == nil || list.Kind != yaml.SequenceNode {
		return nil
	}
	desc := (&secv1beta1.RequestAuthentication{}).ProtoReflect().Descriptor()
	for i, p := range list.Content {
		if spec := lookup(p, "spec"); spec != nil {
			if err := checkMessage(spec, desc, "spec"); err != nil {
				return fmt.Errorf("discovery.static.requestAuthentications[%d]%s: %w", i, policyName(p), err)
			}
		}
	}
	return nil
}

// validateRequestAuthentications: each needs a name, a namespace and a spec; each rule an
// issuer, as istiod's validation asks (a rule without jwks or jwksUri finds its keys through the
// issuer's OpenID configuration).
func validateRequestAuthentications(ras []RequestAuthentication) []error {
	var errs []error
	for i, ra := range ras {
		where := fmt.Sprintf("discovery.static.requestAuthentications[%d]", i)
		if ra.Name == "" || ra.Namespace == "" || ra.Spec == nil {
			errs = append(errs, fmt.Errorf("%s: a RequestAuthentication needs name, namespace and spec", where))
			continue
		}
		for j, r := range ra.Spec.GetJwtRules() {
			if r.GetIssuer() == "" {
				errs = append(errs, fmt.Errorf("%s (%s/%s): jwtRules[%d] needs an issuer", where, ra.Namespace, ra.Name, j))
			}
		}
	}
	return errs
}

// Authn builds the RequestAuthentication authenticator of the static discovery; keys fetches
// and caches jwksUri key sets (nil: its own), now is the clock (nil: time.Now).
func (c *Config) Authn(keys *authn.Keys, now func() time.Time) *authn.Authenticator {
	var ps []*authn.Policy
	if c.Discovery.Static != nil {
		for _, ra := range c.Discovery.Static.RequestAuthentications {
			ps = append(ps, &authn.Policy{Namespace: ra.Namespace, Name: ra.Name, Spec: ra.Spec})
		}
	}
	return authn.New(authz.Waypoint{Namespace: c.Waypoint.Namespace, Gateway: c.Waypoint.Gateway, RootNamespace: c.Waypoint.RootNamespace}, ps, keys, now)
}
