package mesh

import "testing"

func TestParseMeshConfig(t *testing.T) {
	mc, err := ParseMeshConfig(`
rootNamespace: istio-system
aFieldOfANewerIstio: 1
extensionProviders:
- name: opa
  envoyExtAuthzGrpc: {service: opa.demo.svc.cluster.local, port: 9191, timeout: 2s,
    includeRequestBodyInCheck: {maxRequestBytes: 8192, allowPartialMessage: true, packAsBytes: true}}
`)
	if err != nil {
		t.Fatal(err)
	}
	p := mc.GetExtensionProviders()
	if len(p) != 1 || p[0].GetEnvoyExtAuthzGrpc().GetPort() != 9191 || p[0].GetEnvoyExtAuthzGrpc().GetTimeout().GetSeconds() != 2 {
		t.Fatalf("got %v", mc)
	}
	if b := p[0].GetEnvoyExtAuthzGrpc().GetIncludeRequestBodyInCheck(); b.GetMaxRequestBytes() != 8192 || !b.GetAllowPartialMessage() || !b.GetPackAsBytes() {
		t.Fatalf("includeRequestBodyInCheck: %v", b)
	}
	if mc, err := ParseMeshConfig(""); err != nil || len(mc.GetExtensionProviders()) != 0 {
		t.Fatalf("empty: %v %v", mc, err)
	}
	if _, err := ParseMeshConfig("extensionProviders: {name: x}"); err == nil {
		t.Fatal("a mapping for a list parsed")
	}
}

func FuzzParseMeshConfig(f *testing.F) {
	f.Add("extensionProviders:\n- name: opa\n  envoyExtAuthzHttp: {service: a, port: 1, timeout: 1s}\n")
	f.Add("defaultConfig: {discoveryAddress: istiod:15012}\n")
	f.Fuzz(func(t *testing.T, y string) {
		mc, err := ParseMeshConfig(y)
		if err == nil && mc == nil {
			t.Fatal("no config and no error")
		}
	})
}
