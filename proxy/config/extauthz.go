package config

import (
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"

	"github.com/detour-mesh/detour/proxy/extauthz"
)

// ExtensionProvider is one entry of Istio's mesh config extensionProviders (name plus one of
// envoyExtAuthzHttp, envoyExtAuthzGrpc; other kinds are accepted and unused), decoded strictly.
type ExtensionProvider struct {
	*meshv1alpha1.MeshConfig_ExtensionProvider
}

// UnmarshalJSON decodes with protojson, unknown fields refused.
func (p *ExtensionProvider) UnmarshalJSON(b []byte) error {
	p.MeshConfig_ExtensionProvider = &meshv1alpha1.MeshConfig_ExtensionProvider{}
	if err := protojson.Unmarshal(b, p.MeshConfig_ExtensionProvider); err != nil {
		return fmt.Errorf("extension provider: %s", strings.TrimPrefix(err.Error(), "proto: "))
	}
	return nil
}

// ExtensionProviders are the static document's providers (Kubernetes discovery reads istiod's
// `istio` ConfigMap instead).
func (c *Config) ExtensionProviders() []*meshv1alpha1.MeshConfig_ExtensionProvider {
	if c.Discovery.Static == nil {
		return nil
	}
	var out []*meshv1alpha1.MeshConfig_ExtensionProvider
	for _, p := range c.Discovery.Static.ExtensionProviders {
		out = append(out, p.MeshConfig_ExtensionProvider)
	}
	return out
}

// checkProviders refuses a field MeshConfig.ExtensionProvider does not have in
// discovery.static.extensionProviders, naming the field and its YAML line, as checkPolicies.
func checkProviders(doc []byte) error {
	var root yaml.Node
	if err := yaml.Unmarshal(doc, &root); err != nil || len(root.Content) == 0 {
		return nil
	}
	ps := lookup(lookup(lookup(root.Content[0], "discovery"), "static"), "extensionProviders")
	if ps == nil || ps.Kind != yaml.SequenceNode {
		return nil
	}
	desc := (&meshv1alpha1.MeshConfig_ExtensionProvider{}).ProtoReflect().Descriptor()
	for i, p := range ps.Content {
		if err := checkMessage(p, desc, fmt.Sprintf("discovery.static.extensionProviders[%d]", i)); err != nil {
			return err
		}
	}
	return nil
}

// validateProviders checks each ext_authz provider as istiod does (port, statusOnError,
// pathPrefix, names unique).
func validateProviders(s *Static) []error {
	var errs []error
	seen := map[string]bool{}
	for i, p := range s.ExtensionProviders {
		if p.MeshConfig_ExtensionProvider == nil {
			errs = append(errs, fmt.Errorf("discovery.static.extensionProviders[%d] is empty", i))
			continue
		}
		if seen[p.GetName()] {
			errs = append(errs, fmt.Errorf("discovery.static.extensionProviders[%d]: name %q is used twice", i, p.GetName()))
		}
		seen[p.GetName()] = true
		switch p.GetProvider().(type) {
		case *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzHttp, *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExtAuthzGrpc:
		default:
			continue // tracing, logging: not detour's
		}
		if err := extauthz.Validate(p.MeshConfig_ExtensionProvider); err != nil {
			errs = append(errs, fmt.Errorf("discovery.static.extensionProviders[%d]: %w", i, err))
		}
	}
	return errs
}

// wellKnown: a message protojson writes as a JSON scalar or free-form value (Duration "1s",
// wrappers, Struct), left to the decoder.
func wellKnown(md protoreflect.MessageDescriptor) bool {
	return md.FullName().Parent() == "google.protobuf"
}
