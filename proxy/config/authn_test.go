package config

import "testing"

const raDoc = `identity: {source: files, files: {cert: a, key: b, bundle: c}}
waypoint: {namespace: demo}
discovery:
  static:
    requestAuthentications:
    - name: jwt
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
`

// A static RequestAuthentication is decoded as strictly as a policy: an unknown field names
// itself and its line; a rule needs an issuer and keys.
func TestDecodeRequestAuthentication(t *testing.T) {
	for _, tc := range []struct{ name, spec, want string }{
		{"jwksUrl would be a rule without keys", "        jwtRules:\n        - issuer: a\n          jwksUrl: https://x/jwks.json\n",
			"discovery.static.requestAuthentications[0] (demo/jwt): line 12: spec.jwtRules[0].jwksUrl is not a field of JWTRule; did you mean jwksUri?"},
		{"fromHeader", "        jwtRules:\n        - issuer: a\n          jwks: '{}'\n          fromHeader: [{name: x}]\n",
			"discovery.static.requestAuthentications[0] (demo/jwt): line 13: spec.jwtRules[0].fromHeader is not a field of JWTRule; did you mean fromHeaders?"},
		{"a header prefix field misspelt", "        jwtRules:\n        - issuer: a\n          jwks: '{}'\n          fromHeaders: [{name: x, prefx: 'Bearer '}]\n",
			"discovery.static.requestAuthentications[0] (demo/jwt): line 13: spec.jwtRules[0].fromHeaders[0].prefx is not a field of JWTHeader; did you mean prefix?"},
		{"no issuer", "        jwtRules: [{jwks: '{}'}]\n",
			"discovery.static.requestAuthentications[0] (demo/jwt): jwtRules[0] needs an issuer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode([]byte(raDoc + tc.spec))
			if err == nil || err.Error() != tc.want {
				t.Fatalf("got  %v\nwant %s", err, tc.want)
			}
		})
	}
}

func TestDecodeRequestAuthenticationValid(t *testing.T) {
	spec := "        jwtRules:\n        - issuer: a\n          jwksUri: https://x/jwks.json\n          timeout: 3s\n          fromHeaders: [{name: x-token, prefix: 'Token '}]\n          fromParams: [token]\n          outputClaimToHeaders: [{header: x-sub, claim: sub}]\n          forwardOriginalToken: true\n"
	c, err := Decode([]byte(raDoc + spec))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Discovery.Static.RequestAuthentications[0].Spec.GetJwtRules()[0]
	if r.GetTimeout().AsDuration().Seconds() != 3 || r.GetFromHeaders()[0].GetPrefix() != "Token " || !r.GetForwardOriginalToken() || r.GetOutputClaimToHeaders()[0].GetClaim() != "sub" {
		t.Fatalf("rule: %v", r)
	}
	if c.Authn(nil, nil) == nil {
		t.Fatal("no authenticator")
	}
}
