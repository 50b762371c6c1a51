package httproute

import (
	"fmt"
	"reflect"
	"strings"

	"go.yaml.in/yaml/v3"
)

// CheckYAML refuses a field of n (one HTTPRoute or GRPCRoute as YAML, grpc saying which) that
// the route types do not have, naming it and its YAML line: the strict JSON decoding that
// follows refuses it too, but cannot say where it was. path names n in the error.
func CheckYAML(n *yaml.Node, grpc bool, path string) error {
	var t reflect.Type = reflect.TypeFor[HTTPRoute]()
	if grpc {
		t = reflect.TypeFor[GRPCRoute]()
	}
	return checkNode(n, t, path)
}

// CheckFields refuses a field of n that the struct type t (through its JSON names) does not
// have, as CheckYAML does; proxy/l4route checks its routes with it.
func CheckFields(n *yaml.Node, t reflect.Type, path string) error { return checkNode(n, t, path) }

func checkNode(n *yaml.Node, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 || n.Kind != yaml.SequenceNode { // RawMessage; or left to the decoder
			return nil
		}
		for i, c := range n.Content {
			if err := checkNode(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return nil
		}
		fields := jsonFields(t)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			ft, ok := fields[k.Value]
			if !ok {
				return fmt.Errorf("line %d: %s.%s is not a field detour knows of %s", k.Line, path, k.Value, t.Name())
			}
			if err := checkNode(v, ft, path+"."+k.Value); err != nil {
				return err
			}
		}
	}
	return nil
}

// jsonFields maps a struct's JSON names (inline structs flattened) to their types.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
		if f.Anonymous && (name == "" || strings.Contains(opts, "inline")) {
			for k, v := range jsonFields(f.Type) {
				out[k] = v
			}
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}
