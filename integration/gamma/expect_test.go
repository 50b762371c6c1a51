package gamma_test

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"reflect"
	"strconv"

	"sigs.k8s.io/gateway-api/conformance"
	"sigs.k8s.io/gateway-api/conformance/utils/http"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
)

// suiteTest is one mesh conformance test as its Go file defines it: its name, manifests and
// the http.ExpectedResponse literals it checks, evaluated from the source (not copied).
type suiteTest struct {
	name      string
	manifests []string
	cases     []http.ExpectedResponse
	weights   map[string]float64 // expectedWeights, for the weight tests
}

// loadSuiteTest parses tests/mesh/<file> from the conformance module's embedded files.
func loadSuiteTest(file string) (*suiteTest, error) {
	src, err := conformance.Manifests.ReadFile("tests/mesh/" + file)
	if err != nil {
		return nil, err
	}
	f, err := parser.ParseFile(token.NewFileSet(), file, src, 0)
	if err != nil {
		return nil, err
	}
	st := &suiteTest{}
	var evalErr error
	ast.Inspect(f, func(n ast.Node) bool {
		if evalErr != nil {
			return false
		}
		switch n := n.(type) {
		case *ast.KeyValueExpr:
			key, _ := n.Key.(*ast.Ident)
			if key == nil {
				return true
			}
			switch key.Name {
			case "ShortName":
				if st.name == "" {
					st.name, _ = strconv.Unquote(n.Value.(*ast.BasicLit).Value)
				}
			case "Manifests":
				if cl, ok := n.Value.(*ast.CompositeLit); ok && len(st.manifests) == 0 {
					for _, e := range cl.Elts {
						s, _ := strconv.Unquote(e.(*ast.BasicLit).Value)
						st.manifests = append(st.manifests, s)
					}
				}
			}
		case *ast.AssignStmt:
			if id, ok := n.Lhs[0].(*ast.Ident); ok && id.Name == "expectedWeights" {
				v := reflect.New(reflect.TypeFor[map[string]float64]()).Elem()
				evalErr = eval(n.Rhs[0], v)
				st.weights = v.Interface().(map[string]float64)
				return false
			}
		case *ast.CompositeLit:
			switch typeName(n.Type) {
			case "[]http.ExpectedResponse":
				for _, e := range n.Elts {
					var er http.ExpectedResponse
					if evalErr = eval(e, reflect.ValueOf(&er).Elem()); evalErr != nil {
						return false
					}
					st.cases = append(st.cases, er)
				}
				return false
			case "http.ExpectedResponse":
				var er http.ExpectedResponse
				evalErr = eval(n, reflect.ValueOf(&er).Elem())
				st.cases = append(st.cases, er)
				return false
			}
		}
		return true
	})
	if evalErr != nil {
		return nil, fmt.Errorf("%s: %w", file, evalErr)
	}
	return st, nil
}

func typeName(e ast.Expr) string {
	switch e := e.(type) {
	case *ast.ArrayType:
		return "[]" + typeName(e.Elt)
	case *ast.SelectorExpr:
		return typeName(e.X) + "." + e.Sel.Name
	case *ast.Ident:
		return e.Name
	case *ast.StarExpr:
		return "*" + typeName(e.X)
	}
	return ""
}

// eval sets v from the literal e: composite literals (types from v), strings, numbers, & and
// the suite's namespace constants. Anything else is an error, so a suite change is noticed.
func eval(e ast.Expr, v reflect.Value) error {
	switch e := e.(type) {
	case *ast.UnaryExpr:
		if e.Op != token.AND || v.Kind() != reflect.Pointer {
			return fmt.Errorf("unsupported expression %T", e)
		}
		p := reflect.New(v.Type().Elem())
		if err := eval(e.X, p.Elem()); err != nil {
			return err
		}
		v.Set(p)
	case *ast.BasicLit:
		switch e.Kind {
		case token.STRING:
			s, err := strconv.Unquote(e.Value)
			if err != nil {
				return err
			}
			v.SetString(s)
		case token.INT:
			n, _ := strconv.ParseInt(e.Value, 0, 64)
			v.SetInt(n)
		case token.FLOAT:
			f, _ := strconv.ParseFloat(e.Value, 64)
			v.SetFloat(f)
		}
	case *ast.Ident:
		switch e.Name {
		case "ns":
			v.SetString(suite.MeshNamespace)
		case "true", "false":
			v.SetBool(e.Name == "true")
		case "host":
			v.SetString("echo") // httproute-weight.go: host := "echo"
		default:
			return fmt.Errorf("unknown identifier %s", e.Name)
		}
	case *ast.SelectorExpr:
		switch typeName(e) {
		case "suite.MeshNamespace":
			v.SetString(suite.MeshNamespace)
		case "suite.MeshConsumerNamespace":
			v.SetString(suite.MeshConsumerNamespace)
		default:
			return fmt.Errorf("unknown selector %s", typeName(e))
		}
	case *ast.CompositeLit:
		return evalComposite(e, v)
	case *ast.BinaryExpr: // string concatenation
		if e.Op != token.ADD || v.Kind() != reflect.String {
			return fmt.Errorf("unsupported operator %s", e.Op)
		}
		var a, b string
		if err := eval(e.X, reflect.ValueOf(&a).Elem()); err != nil {
			return err
		}
		if err := eval(e.Y, reflect.ValueOf(&b).Elem()); err != nil {
			return err
		}
		v.SetString(a + b)
	case *ast.CallExpr: // http.Ipv6SafeHost(v2.Address): the echo-v2 pod's IP
		if typeName(e.Fun) != "http.Ipv6SafeHost" || len(e.Args) != 1 || typeName(e.Args[0]) != "v2.Address" {
			return fmt.Errorf("unsupported call %s", typeName(e.Fun))
		}
		v.SetString(podIP("v2"))
	default:
		return fmt.Errorf("unsupported expression %T", e)
	}
	return nil
}

func evalComposite(e *ast.CompositeLit, v reflect.Value) error {
	switch v.Kind() {
	case reflect.Struct:
		for _, el := range e.Elts {
			kv, ok := el.(*ast.KeyValueExpr)
			if !ok {
				return fmt.Errorf("unkeyed field in %s", v.Type())
			}
			name := kv.Key.(*ast.Ident).Name
			f := v.FieldByName(name)
			if !f.IsValid() {
				return fmt.Errorf("%s has no field %s", v.Type(), name)
			}
			if err := eval(kv.Value, f); err != nil {
				return fmt.Errorf("%s.%s: %w", v.Type().Name(), name, err)
			}
		}
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		for _, el := range e.Elts {
			kv := el.(*ast.KeyValueExpr)
			k := reflect.New(v.Type().Key()).Elem()
			val := reflect.New(v.Type().Elem()).Elem()
			if err := eval(kv.Key, k); err != nil {
				return err
			}
			if err := eval(kv.Value, val); err != nil {
				return err
			}
			m.SetMapIndex(k, val)
		}
		v.Set(m)
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), len(e.Elts), len(e.Elts))
		for i, el := range e.Elts {
			if err := eval(el, s.Index(i)); err != nil {
				return err
			}
		}
		v.Set(s)
	default:
		return fmt.Errorf("composite literal for %s", v.Type())
	}
	return nil
}

func podIP(version string) string {
	for _, p := range pods {
		if p.version == version {
			return p.ip
		}
	}
	return ""
}
