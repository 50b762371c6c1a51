package config

import (
	"net/http/httptest"
	"strings"
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
	if m, attached := rt.Match("demo", "echo", 80, r, "/v1", false); !attached || m.Rule != nil {
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
			`httproute: HTTPRoute demo/split: rules[0]: filters[0]: filter type "ExtensionRef" is not supported here (detour implements RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, and for HTTPRoute RequestRedirect, URLRewrite and CORS)`},
		{withRoutes + "    grpcRoutes:\n    - metadata: {name: g, namespace: demo}\n      spec: {rules: [{matches: [{method: {service: a, verb: b}}]}]}\n",
			"line 34: discovery.static.grpcRoutes[0].spec.rules[0].matches[0].method.verb is not a field detour knows of MethodMatch"},
		// A consumer route (neither the service's namespace nor the waypoint's) is refused: the
		// waypoint would not apply it, as Istio's does not.
		{strings.Replace(strings.Replace(withRoutes, "name: split, namespace: demo}", "name: split, namespace: frontend}", 1), "name: echo, port: 80}]", "name: echo, namespace: demo, port: 80}]", 1),
			"discovery.static: HTTPRoute frontend/split (parent Service demo/echo): " + outOfScopeWhy},
	} {
		_, err := Decode([]byte(tc.doc))
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || err.Error() != tc.want) {
			t.Errorf("Decode = %v\nwant %s", err, tc.want)
		}
	}
}

const withL4Routes = example + `    tcpRoutes:
    - apiVersion: gateway.networking.k8s.io/v1
      kind: TCPRoute
      metadata: {name: db, namespace: demo}
      spec:
        parentRefs: [{name: echo, port: 80}]
        rules:
        - backendRefs: [{name: echo, port: 80, weight: 2}]
    tlsRoutes:
    - apiVersion: gateway.networking.k8s.io/v1alpha2
      kind: TLSRoute
      metadata: {name: sni, namespace: demo}
      spec:
        parentRefs: [{name: echo}]
        hostnames: ["*.example.com"]
        rules:
        - backendRefs: [{name: echo, port: 80}]
`

func TestDecodeL4Routes(t *testing.T) {
	c, err := Decode([]byte(withL4Routes))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := c.L4Routes()
	if err != nil {
		t.Fatal(err)
	}
	rs := rt.For("demo", "echo", 80)
	if !rs.NeedsSNI() || rs.Match(true, "a.example.com").Route != "TLSRoute demo/sni" || rs.Match(false, "").Route != "TCPRoute demo/db" {
		t.Errorf("static TCPRoute and TLSRoute not attached to echo:80 as written")
	}
}

func TestDecodeL4RoutesErrors(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{withL4Routes + "          filters: []\n",
			"line 40: discovery.static.tlsRoutes[0].spec.rules[0].filters is not a field detour knows of RouteRule"},
		{strings.Replace(withL4Routes, "        parentRefs: [{name: echo, port: 80}]\n", "        hostnames: [a.b]\n", 1),
			"line 28: discovery.static.tcpRoutes[0].spec.hostnames is not a field detour knows of TCPRouteSpec"},
		{strings.Replace(withL4Routes, "weight: 2}]\n", "weight: 2}]\n        - backendRefs: [{name: echo, port: 80}]\n", 1),
			"l4route: TCPRoute demo/db: has 2 rules; a TCPRoute has exactly one (gateway.networking.k8s.io/v1), merge them into one rule's backendRefs"},
		{strings.Replace(withL4Routes, "parentRefs: [{name: echo}]", "parentRefs: [{name: echo, namespace: demo}]", 1),
			""},
		{strings.Replace(strings.Replace(withL4Routes, "name: sni, namespace: demo}", "name: sni, namespace: frontend}", 1), "parentRefs: [{name: echo}]", "parentRefs: [{name: echo, namespace: demo}]", 1),
			"discovery.static: TLSRoute frontend/sni (parent Service demo/echo): " + outOfScopeWhy},
		{strings.Replace(withL4Routes, `"*.example.com"`, `"*"`, 1),
			`l4route: TLSRoute demo/sni: hostnames[0]: "*" is not a hostname (lower-case RFC 1123 labels, optionally a first label *.; no IP)`},
	} {
		_, err := Decode([]byte(tc.doc))
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || err.Error() != tc.want) {
			t.Errorf("Decode = %v\nwant %s", err, tc.want)
		}
	}
}

const outOfScopeWhy = "the route is in neither the service's namespace nor the waypoint's (demo), so the waypoint does not apply it, as Istio's does not (a consumer route; move it to one of those namespaces)"
