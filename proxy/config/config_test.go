package config

import (
	"github.com/detour-mesh/detour/proxy/authz"
	"strings"
	"testing"
	"time"
)

const example = `
identity:
  source: devca
  devca: {dir: /tmp/ca, id: spiffe://cluster.local/ns/demo/sa/detour}
waypoint:
  namespace: demo
discovery:
  static:
    services:
    - name: echo
      namespace: demo
      vips: [10.96.0.10]
      ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
      endpoints: [{ip: 10.244.0.5, serviceAccount: echo}]
    policies:
    - name: only-default
      namespace: demo
      spec:
        targetRefs: [{kind: Service, name: echo}]
        action: ALLOW
        rules:
        - from: [{source: {namespaces: [default]}}]
`

func TestDecode(t *testing.T) {
	c, err := Decode([]byte(example))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listeners.HBONE != "0.0.0.0:15008" || c.Waypoint.Gateway != "detour" || c.Discovery.Source != "static" ||
		c.Discovery.Static.Services[0].Hostname != "echo.demo.svc.cluster.local" || c.Listeners.UpstreamHBONEPort != 15008 {
		t.Fatalf("defaults: %+v", c)
	}
	p := c.Discovery.Static.Policies[0].Spec
	if p.GetAction().String() != "ALLOW" || p.GetRules()[0].GetFrom()[0].GetSource().GetNamespaces()[0] != "default" || p.GetTargetRefs()[0].GetName() != "echo" {
		t.Fatalf("policy: %v", p)
	}
	if c.Waypoint.NumTrustedProxies != 0 {
		t.Fatalf("numTrustedProxies default: %d", c.Waypoint.NumTrustedProxies)
	}
	if c, err := Decode([]byte(strings.Replace(example, "  namespace: demo\ndiscovery", "  namespace: demo\n  numTrustedProxies: 2\ndiscovery", 1))); err != nil || c.Waypoint.NumTrustedProxies != 2 {
		t.Fatalf("numTrustedProxies: %v, %v", c, err)
	}
	if _, err := c.Routes(); err != nil {
		t.Fatal(err)
	}
	if d := c.Waypoint.Drain; d.Period.Duration != 0 || d.Timeout.Duration != DefaultDrainTimeout {
		t.Fatalf("drain defaults, static discovery: %v %v", d.Period, d.Timeout)
	}
	k, err := Decode([]byte("identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x}\ndiscovery: {source: kubernetes}\n"))
	if err != nil || k.Waypoint.Drain.Period.Duration != DefaultDrainPeriod {
		t.Fatalf("drain period default, Kubernetes discovery: %+v, %v", k, err)
	}
	c, err = Decode([]byte(strings.Replace(example, "  namespace: demo\ndiscovery", "  namespace: demo\n  drain: {period: 0s, timeout: 1m}\ndiscovery", 1)))
	if err != nil || c.Waypoint.Drain.Period.Duration != 0 || c.Waypoint.Drain.Timeout.Duration != time.Minute {
		t.Fatalf("drain: %+v, %v", c, err)
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{"identity: {source: devca}\nwaypoint: {namespace: x}\ndiscovery: {static: {}}\n", "identity.devca.dir and identity.devca.id are required with source devca"},
		{"identity: {source: magic}\nwaypoint: {namespace: x}\ndiscovery: {static: {}}\n", `identity.source "magic" is not one of devca, files, istio-ca, workload-api`},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\ndiscovery: {static: {}}\n", "waypoint.namespace is required"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x}\ndiscovery: {source: kubernetes, static: {}}\n", "discovery.static is not used with source kubernetes; remove it"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x}\nlistners: {}\n", `json: unknown field "listners"`},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, inspect: sometimes}\ndiscovery: {static: {}}\n", `waypoint.inspect "sometimes" is not one of auto, always, opaque`},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, numTrustedProxies: -1}\ndiscovery: {static: {}}\n", "waypoint.numTrustedProxies -1 is negative; use 0 (the rightmost X-Forwarded-For address) or more"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, bindTTL: 2h}\ndiscovery: {static: {}}\n", "waypoint.bindTTL 2h0m0s is outside 0s..1h (the other replicas ignore a longer one)"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, sniffWait: 10m}\ndiscovery: {static: {}}\n", "waypoint.sniffWait 10m0s is outside 1ms..5m (the default, 15s, is Envoy's listener filter timeout)"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, sniffWait: -1s}\ndiscovery: {static: {}}\n", "waypoint.sniffWait -1s is outside 1ms..5m (the default, 15s, is Envoy's listener filter timeout)"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, maxSniffingPerClient: -1}\ndiscovery: {static: {}}\n", "waypoint.maxSniffingPerClient -1 is negative; leave it out for the default (64)"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, sniffWait: 15}\ndiscovery: {static: {}}\n", "duration: json: cannot unmarshal number into Go value of type string"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, drain: {period: 6m, timeout: -1s}}\ndiscovery: {static: {}}\n",
			"waypoint.drain.period 6m0s is outside 0s..5m\nwaypoint.drain.timeout -1s is outside 0s..1h"},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x, drain: {periods: 1s}}\ndiscovery: {static: {}}\n", `json: unknown field "periods"`},
		{"identity: {source: files, files: {cert: a, key: b, bundle: c}}\nwaypoint: {namespace: x}\ndiscovery: {static: {services: [{name: s, namespace: ns1, vips: [nope], endpoints: [{ip: 10.0.0.1}]}]}}\n",
			"service ns1/s: vip \"nope\": ParseAddr(\"nope\"): unable to parse IP\nservice ns1/s: endpoint 10.0.0.1 needs serviceAccount (the identity its ztunnel presents)"},
	} {
		_, err := Decode([]byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("got %v\nwant %s", err, tc.want)
		}
	}
}

func TestDryRunPolicy(t *testing.T) {
	doc := strings.Replace(example, "    - name: only-default\n      namespace: demo\n", "    - name: only-default\n      namespace: demo\n      annotations: {istio.io/dry-run: \"true\"}\n", 1)
	c, err := Decode([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	d := c.Authz().Decide(&authz.Request{Principal: "cluster.local/ns/prod/sa/x", Service: authz.Service{Namespace: "demo", Name: "echo"}})
	if d.String() != "allow: no policy applies" || len(d.DryRun) != 1 || d.DryRun[0] != "demo/only-default: deny" {
		t.Fatalf("got %s, dry-run %q", d, d.DryRun)
	}
}
