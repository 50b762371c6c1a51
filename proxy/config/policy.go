package config

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/reflect/protoreflect"
	secv1beta1 "istio.io/api/security/v1beta1"
)

// checkPolicies refuses a field that AuthorizationPolicy does not have, or an action that is
// not one, in each discovery.static.policies[].spec of doc, naming the field and its YAML line.
// istio.io/api's own decoder ignores unknown fields, so `acton: DENY` would silently be an ALLOW
// policy and `principles:` an ALLOW for everyone. A document not shaped as expected is left to
// the strict decoder that follows.
func checkPolicies(doc []byte) error {
	var root yaml.Node
	if err := yaml.Unmarshal(doc, &root); err != nil || len(root.Content) == 0 {
		return nil
	}
	policies := lookup(lookup(lookup(root.Content[0], "discovery"), "static"), "policies")
	if policies == nil || policies.Kind != yaml.SequenceNode {
		return nil
	}
	desc := (&secv1beta1.AuthorizationPolicy{}).ProtoReflect().Descriptor()
	for i, p := range policies.Content {
		if spec := lookup(p, "spec"); spec != nil {
			if err := checkMessage(spec, desc, "spec"); err != nil {
				return fmt.Errorf("discovery.static.policies[%d]%s: %w", i, policyName(p), err)
			}
		}
	}
	return nil
}

// policyName is " (namespace/name)" when the policy gives both.
func policyName(p *yaml.Node) string {
	ns, name := lookup(p, "namespace"), lookup(p, "name")
	if ns == nil || name == nil {
		return ""
	}
	return " (" + ns.Value + "/" + name.Value + ")"
}

// lookup is the value of key in mapping n; nil if n is not a mapping or has no such key.
func lookup(n *yaml.Node, key string) *yaml.Node {
	if n == nil || n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}

// checkMessage walks mapping n against message md; path names n in errors.
func checkMessage(n *yaml.Node, md protoreflect.MessageDescriptor, path string) error {
	if wellKnown(md) {
		return nil
	}
	if n.Kind != yaml.MappingNode {
		if n.Tag == "!!null" {
			return nil
		}
		return fmt.Errorf("line %d: %s must be a mapping of %s fields", n.Line, path, md.Name())
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		fd := md.Fields().ByJSONName(k.Value)
		if fd == nil {
			fd = md.Fields().ByName(protoreflect.Name(k.Value))
		}
		if fd == nil {
			return fmt.Errorf("line %d: %s.%s is not a field of %s%s", k.Line, path, k.Value, md.Name(), suggest(k.Value, md))
		}
		if err := checkValue(v, fd, path+"."+k.Value); err != nil {
			return err
		}
	}
	return nil
}

func checkValue(v *yaml.Node, fd protoreflect.FieldDescriptor, path string) error {
	switch {
	case fd.IsMap() || v.Tag == "!!null":
		return nil
	case fd.IsList():
		if v.Kind != yaml.SequenceNode {
			return fmt.Errorf("line %d: %s must be a list", v.Line, path)
		}
		for j, e := range v.Content {
			if err := checkElem(e, fd, path+"["+strconv.Itoa(j)+"]"); err != nil {
				return err
			}
		}
		return nil
	}
	return checkElem(v, fd, path)
}

func checkElem(v *yaml.Node, fd protoreflect.FieldDescriptor, path string) error {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		if fd.Message().FullName() == "google.protobuf.Duration" && v.Kind == yaml.ScalarNode {
			return nil // "5s", as protojson writes a Duration
		}
		return checkMessage(v, fd.Message(), path)
	case protoreflect.EnumKind:
		ed := fd.Enum()
		if ed.Values().ByName(protoreflect.Name(v.Value)) != nil {
			return nil
		}
		if n, err := strconv.ParseInt(v.Value, 10, 32); err == nil && ed.Values().ByNumber(protoreflect.EnumNumber(n)) != nil {
			return nil
		}
		var names []string
		for i := range ed.Values().Len() {
			names = append(names, string(ed.Values().Get(i).Name()))
		}
		return fmt.Errorf("line %d: %s %q is not one of %s", v.Line, path, v.Value, strings.Join(names, ", "))
	case protoreflect.StringKind:
		if v.Kind == yaml.ScalarNode && (v.Tag != "!!str" || v.Style == 0 && yaml11Bool(v.Value)) {
			return fmt.Errorf("line %d: %s %s must be a string: quote it (%q)", v.Line, path, v.Value, v.Value)
		}
	}
	return nil
}

// yaml11Bool: a plain word YAML 1.1 (which the document decoder follows) reads as a boolean.
func yaml11Bool(s string) bool {
	switch s {
	case "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF":
		return true
	}
	return false
}

// suggest is "; did you mean X?" for the field of md closest to name, if close enough.
func suggest(name string, md protoreflect.MessageDescriptor) string {
	best, dist := "", 3
	for i := range md.Fields().Len() {
		f := md.Fields().Get(i).JSONName()
		if d := distance(strings.ToLower(name), strings.ToLower(f)); d < dist {
			best, dist = f, d
		}
	}
	if best == "" {
		var names []string
		for i := range md.Fields().Len() {
			names = append(names, md.Fields().Get(i).JSONName())
		}
		slices.Sort(names)
		return " (its fields: " + strings.Join(names, ", ") + ")"
	}
	return "; did you mean " + best + "?"
}

// distance is the Levenshtein distance of a and b.
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}
