package config

import (
	"net/http/httptest"
	"testing"
)

const withRoutes = example + `    httpRoutes:
    - apiVersion: gateway.networking.k8s.io/v1
      kind: HTTPRoute
      metadata: {name: split, namespace: demo}
      spec:
        parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
        rules:
        - matches: [{path: {type: PathPrefix, value: /v2}}]
          backendRefs: [{name: echo, port: 80}]
`

func TestDecodeRoutes(t *testing.T) {
	c, err := Decode([]byte(withRoutes))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := c.HTTPRoutes()
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest("GET", "/v1", nil)
	if m, attached := rt.Match("demo", "echo", 80, "demo", r, "/v1", false); !attached || m.Rule != nil {
		t.Errorf("/v1 on a routed service: attached %v, rule %v; want attached, no rule (404)", attached, m.Rule)
	}
}

func TestDecodeRoutesErrors(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{withRoutes + "          timeout: 1s\n",
			"line 32: discovery.static.httpRoutes[0].spec.rules[0].timeout is not a field detour knows of HTTPRule"},
		{withRoutes + "          sessionPersistence: {sessionName: x}\n",
			"line 32: discovery.static.httpRoutes[0].spec.rules[0].sessionPersistence is not a field detour knows of HTTPRule"},
		{withRoutes + "          filters: [{type: ExtensionRef, requestHeaderModifier: {}}]\n",
			`httproute: HTTPRoute demo/split: rules[0]: filters[0]: filter type "ExtensionRef" is not supported here (detour implements RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, and for HTTPRoute RequestRedirect and URLRewrite)`},
		{withRoutes + "    grpcRoutes:\n    - metadata: {name: g, namespace: demo}\n      spec: {rules: [{matches: [{method: {service: a, verb: b}}]}]}\n",
			"line 34: discovery.static.grpcRoutes[0].spec.rules[0].matches[0].method.verb is not a field detour knows of MethodMatch"},
	} {
		_, err := Decode([]byte(tc.doc))
		if err == nil || err.Error() != tc.want {
			t.Errorf("Decode = %v\nwant %s", err, tc.want)
		}
	}
}
