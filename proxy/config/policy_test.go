package config

import "testing"

const policyDoc = `identity: {source: files, files: {cert: a, key: b, bundle: c}}
waypoint: {namespace: demo}
discovery:
  static:
    policies:
    - name: p
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
`

// Every field of a static AuthorizationPolicy is checked: istio.io/api's decoder ignores the
// unknown ones, which turned a typo into a wider policy.
func TestDecodePolicyStrict(t *testing.T) {
	for _, tc := range []struct{ name, spec, want string }{
		{"acton: DENY would be an ALLOW policy", "        acton: DENY\n        rules: [{}]\n",
			"discovery.static.policies[0] (demo/p): line 10: spec.acton is not a field of AuthorizationPolicy; did you mean action?"},
		{"principles: would grant STEAL to everyone", "        rules:\n        - from:\n          - source:\n              principles: [cluster.local/ns/dev/sa/alice]\n          to: [{operation: {methods: [STEAL]}}]\n",
			"discovery.static.policies[0] (demo/p): line 13: spec.rules[0].from[0].source.principles is not a field of Source; did you mean principals?"},
		{"unknown action", "        action: DENNY\n",
			`discovery.static.policies[0] (demo/p): line 10: spec.action "DENNY" is not one of ALLOW, DENY, AUDIT, CUSTOM`},
		{"a field far from any", "        frobnicate: true\n",
			"discovery.static.policies[0] (demo/p): line 10: spec.frobnicate is not a field of AuthorizationPolicy (its fields: action, provider, rules, selector, targetRef, targetRefs)"},
		{"rules not a list", "        rules: {from: []}\n",
			"discovery.static.policies[0] (demo/p): line 10: spec.rules must be a list"},
		{"unknown field in a nested message", "        rules: [{}]\n        action: DENY\n        provider: {nme: x}\n",
			"discovery.static.policies[0] (demo/p): line 12: spec.provider.nme is not a field of ExtensionProvider; did you mean name?"},
		{"a port as a number", "        rules: [{to: [{operation: {ports: [8080]}}]}]\n",
			`discovery.static.policies[0] (demo/p): line 10: spec.rules[0].to[0].operation.ports[0] 8080 must be a string: quote it ("8080")`},
		{"a YAML 1.1 boolean word as a value", "        rules: [{when: [{key: \"request.headers[x-debug]\", values: [on]}]}]\n",
			`discovery.static.policies[0] (demo/p): line 10: spec.rules[0].when[0].values[0] on must be a string: quote it ("on")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode([]byte(policyDoc + tc.spec))
			if err == nil || err.Error() != tc.want {
				t.Fatalf("got  %v\nwant %s", err, tc.want)
			}
		})
	}
}

func TestDecodePolicyValid(t *testing.T) {
	spec := "        action: DENY\n        rules:\n        - from: [{source: {principals: [a], not_namespaces: [b]}}]\n          to: [{operation: {methods: [GET], notPaths: [/x]}}]\n          when: [{key: \"request.headers[x]\", values: [v]}]\n"
	c, err := Decode([]byte(policyDoc + spec))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Discovery.Static.Policies[0].Spec.GetRules()[0]
	if c.Discovery.Static.Policies[0].Spec.GetAction().String() != "DENY" || r.GetFrom()[0].GetSource().GetNotNamespaces()[0] != "b" || r.GetWhen()[0].GetKey() != "request.headers[x]" {
		t.Fatalf("policy: %v", c.Discovery.Static.Policies[0].Spec)
	}
	if len(r.GetTo()[0].GetOperation().GetNotPaths()) != 1 {
		t.Fatalf("operation: %v", r.GetTo()[0])
	}
}
