package config

import (
	"testing"
	"time"
)

const providersDoc = `identity: {source: files, files: {cert: a, key: b, bundle: c}}
waypoint: {namespace: demo}
discovery:
  static:
    extensionProviders:
`

func TestDecodeExtensionProviders(t *testing.T) {
	c, err := Decode([]byte(providersDoc + `    - name: opa
      envoyExtAuthzGrpc: {service: opa.demo.svc.cluster.local, port: 9191, timeout: 1.5s, failOpen: true}
    - name: oauth
      envoyExtAuthzHttp:
        service: demo/oauth.demo.svc.cluster.local
        port: 8080
        pathPrefix: /check
        statusOnError: "503"
        includeRequestHeadersInCheck: [cookie, x-ext-authz*]
        includeAdditionalHeadersInCheck: {x-from: detour}
        headersToUpstreamOnAllow: [x-user]
        headersToDownstreamOnDeny: [set-cookie]
        includeRequestBodyInCheck: {maxRequestBytes: 4096, allowPartialMessage: true}
    - name: zipkin
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
`))
	if err != nil {
		t.Fatal(err)
	}
	ps := c.ExtensionProviders()
	if len(ps) != 3 {
		t.Fatalf("got %d providers, want 3", len(ps))
	}
	g := ps[0].GetEnvoyExtAuthzGrpc()
	if ps[0].GetName() != "opa" || g.GetPort() != 9191 || g.GetTimeout().AsDuration() != 1500*time.Millisecond || !g.GetFailOpen() {
		t.Errorf("grpc provider: %v", ps[0])
	}
	h := ps[1].GetEnvoyExtAuthzHttp()
	if h.GetPathPrefix() != "/check" || h.GetStatusOnError() != "503" || h.GetIncludeAdditionalHeadersInCheck()["x-from"] != "detour" ||
		h.GetIncludeRequestBodyInCheck().GetMaxRequestBytes() != 4096 || len(h.GetHeadersToDownstreamOnDeny()) != 1 {
		t.Errorf("http provider: %v", ps[1])
	}
}

// Typos and invalid values are refused, naming the field (and its line where the YAML gives it).
func TestDecodeExtensionProvidersStrict(t *testing.T) {
	for _, tc := range []struct{ name, doc, want string }{
		{"unknown field", "    - name: opa\n      envoyExtAuthzGrpc: {servce: opa, port: 9191}\n",
			"line 7: discovery.static.extensionProviders[0].envoyExtAuthzGrpc.servce is not a field of EnvoyExternalAuthorizationGrpcProvider; did you mean service?"},
		{"unknown kind", "    - name: opa\n      envoyExtAuthz: {service: opa, port: 9191}\n",
			"line 7: discovery.static.extensionProviders[0].envoyExtAuthz is not a field of ExtensionProvider (its fields: datadog, envoyExtAuthzGrpc, envoyExtAuthzHttp, envoyFileAccessLog, envoyHttpAls, envoyOtelAls, envoyTcpAls, lightstep, name, opencensus, opentelemetry, prometheus, sds, skywalking, stackdriver, zipkin)"},
		{"port out of range", "    - name: opa\n      envoyExtAuthzGrpc: {service: opa, port: 0}\n",
			`discovery.static.extensionProviders[0]: extauthz: provider "opa": port must be in 1..65535, got 0`},
		{"bad statusOnError", "    - name: opa\n      envoyExtAuthzHttp: {service: opa, port: 80, statusOnError: \"abc\"}\n",
			`discovery.static.extensionProviders[0]: extauthz: provider "opa": statusOnError "abc" is not an HTTP status Envoy knows`},
		{"pathPrefix without /", "    - name: opa\n      envoyExtAuthzHttp: {service: opa, port: 80, pathPrefix: check}\n",
			`discovery.static.extensionProviders[0]: extauthz: provider "opa": pathPrefix must begin with /, got "check"`},
		{"single wildcard", "    - name: opa\n      envoyExtAuthzHttp: {service: opa, port: 80, headersToUpstreamOnAllow: [\"*\"]}\n",
			`discovery.static.extensionProviders[0]: extauthz: provider "opa": headersToUpstreamOnAllow: a single wildcard ("*") is not supported (istiod refuses it); use a prefix or suffix`},
		{"duplicate name", "    - {name: opa, envoyExtAuthzGrpc: {service: a, port: 1}}\n    - {name: opa, envoyExtAuthzGrpc: {service: b, port: 1}}\n",
			`discovery.static.extensionProviders[1]: name "opa" is used twice`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode([]byte(providersDoc + tc.doc))
			if err == nil || err.Error() != tc.want {
				t.Fatalf("got  %v\nwant %s", err, tc.want)
			}
		})
	}
}
