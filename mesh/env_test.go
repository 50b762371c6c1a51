package mesh

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The expansion table of k8s.io/kubernetes v1.37 third_party/forked/golang/expansion/expand_test.go
// (doExpansionTest, with TestMappingDual's two maps), run against expand.
func TestExpand(t *testing.T) {
	maps := []map[string]string{{"VAR_A": "A", "VAR_EMPTY": ""}, {"VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)"}}
	lookup := func(name string) (string, bool) {
		for _, m := range maps {
			if v, ok := m[name]; ok {
				return v, true
			}
		}
		return "", false
	}
	for _, c := range []struct{ name, in, want string }{
		{"whole string", "$(VAR_A)", "A"},
		{"repeat", "$(VAR_A)-$(VAR_A)", "A-A"},
		{"beginning", "$(VAR_A)-1", "A-1"},
		{"middle", "___$(VAR_B)___", "___B___"},
		{"end", "___$(VAR_C)", "___C"},
		{"compound", "$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"},
		{"escape & expand", "$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"},
		{"compound escape", "$$(VAR_A)_$$(VAR_B)", "$(VAR_A)_$(VAR_B)"},
		{"mixed in escapes", "f000-$$VAR_A", "f000-$VAR_A"},
		{"backslash escape ignored", "foo\\$(VAR_C)bar", "foo\\Cbar"},
		{"backslash escape ignored 2", "foo\\\\$(VAR_C)bar", "foo\\\\Cbar"},
		{"lots of backslashes", "foo\\\\\\\\$(VAR_A)bar", "foo\\\\\\\\Abar"},
		{"nested var references", "$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"},
		{"nested var references second type", "$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"},
		{"value is a reference", "$(VAR_REF)", "$(VAR_A)"},
		{"value is a reference x 2", "%%$(VAR_REF)--$(VAR_REF)%%", "%%$(VAR_A)--$(VAR_A)%%"},
		{"empty var", "foo$(VAR_EMPTY)bar", "foobar"},
		{"unterminated expression", "foo$(VAR_Awhoops!", "foo$(VAR_Awhoops!"},
		{"expression without operator", "f00__(VAR_A)__", "f00__(VAR_A)__"},
		{"shell special vars pass through", "$?_boo_$!", "$?_boo_$!"},
		{"bare operators are ignored", "$VAR_A", "$VAR_A"},
		{"undefined vars are passed through", "$(VAR_DNE)", "$(VAR_DNE)"},
		{"multiple (even) operators, var undefined", "$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"},
		{"multiple (even) operators, var defined", "$$$$$$(VAR_A)", "$$$(VAR_A)"},
		{"multiple (odd) operators, var undefined", "$$$$$$$(GOOD_ODDS)", "$$$$(GOOD_ODDS)"},
		{"multiple (odd) operators, var defined", "$$$$$$$(VAR_A)", "$$$A"},
		{"missing open expression", "$VAR_A)", "$VAR_A)"},
		{"shell syntax ignored", "${VAR_A}", "${VAR_A}"},
		{"trailing incomplete expression not consumed", "$(VAR_B)_______$(A", "B_______$(A"},
		{"trailing incomplete expression, no content, is not consumed", "$(VAR_C)_______$(", "C_______$("},
		{"operator at end of input string is preserved", "$(VAR_A)foobarzab$", "Afoobarzab$"},
		{"shell escaped incomplete expr", "foo-\\$(VAR_A", "foo-\\$(VAR_A"},
		{"lots of $( in middle", "--$($($($($--", "--$($($($($--"},
		{"lots of $( in beginning", "$($($($($--foo$(", "$($($($($--foo$("},
		{"lots of $( at end", "foo0--$($($($(", "foo0--$($($($("},
		{"escaped operators in variable names are not escaped", "$(foo$$var)", "$(foo$$var)"},
		{"newline not expanded", "\n", "\n"},
		{"dollar sign followed by non-ASCII UTF-8 character", "$£FOO", "$£FOO"},
		{"dollar sign followed by multi-byte UTF-8 character in middle", "prefix-$€-suffix", "prefix-$€-suffix"},
		{"dollar sign followed by Chinese character", "$中文", "$中文"},
	} {
		if got := expand(c.in, lookup); got != c.want {
			t.Errorf("%s: expand(%q) = %q, want %q", c.name, c.in, got, c.want)
		}
	}
}

// expand never grows a string without references, and leaves one without $ alone.
func FuzzExpand(f *testing.F) {
	for _, s := range []string{"$(A)", "$$(A)", "x$(", "$£", "$(A$(B))", "plain"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got := expand(s, func(string) (string, bool) { return "", false })
		if !strings.Contains(s, "$") && got != s {
			t.Fatalf("expand(%q) = %q without a $", s, got)
		}
		if strings.Count(got, "$") > strings.Count(s, "$") {
			t.Fatalf("expand(%q) = %q: more $ than written", s, got)
		}
		expand(s, func(n string) (string, bool) { return n + n, true })
	})
}

// links are the service variables of one single-port TCP Service, as the kubelet's table writes
// them (kubelet_pods_test.go: "KUBERNETES_SERVICE_HOST", ... "KUBERNETES_PORT_8081_TCP_ADDR").
func links(prefix, ip string, port int) []string {
	u := fmt.Sprintf("tcp://%s:%d", ip, port)
	pp := fmt.Sprintf("%s_PORT_%d_TCP", prefix, port)
	return []string{prefix + "_SERVICE_HOST=" + ip, fmt.Sprintf("%s_SERVICE_PORT=%d", prefix, port), prefix + "_PORT=" + u,
		pp + "=" + u, pp + "_PROTO=tcp", fmt.Sprintf("%s_PORT=%d", pp, port), pp + "_ADDR=" + ip}
}

func svc(name, ns, ip string, port int32, created time.Time) corev1.Service {
	return corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, CreationTimestamp: metav1.NewTime(created)},
		Spec: corev1.ServiceSpec{ClusterIP: ip, Ports: []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: port}}}}
}

func field(path string) *corev1.EnvVarSource {
	return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: path}}
}

func cmKey(name, key string, opt bool) *corev1.EnvVarSource {
	return &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: name}, Key: key, Optional: &opt}}
}

func secretKey(name, key string, opt bool) *corev1.EnvVarSource {
	return &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: name}, Key: key, Optional: &opt}}
}

func limit(res, container, divisor string) *corev1.EnvVarSource {
	s := &corev1.ResourceFieldSelector{Resource: res, ContainerName: container}
	if divisor != "" {
		s.Divisor = resource.MustParse(divisor)
	}
	return &corev1.EnvVarSource{ResourceFieldRef: s}
}

// The environment rules, case by case as k8s.io/kubernetes v1.37 pkg/kubelet/kubelet_pods_test.go
// TestMakeEnvironmentVariables tables them (same services, names and expectations where a case
// is theirs), plus what detour adds: services created after the container started, fileKeyRef,
// the node's allocatable as the default of a limit.
func TestEnvironment(t *testing.T) {
	start := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	before := start.Add(-time.Hour)
	services := []corev1.Service{
		svc("kubernetes", "default", "1.2.3.1", 8081, before),
		svc("test", "test1", "1.2.3.3", 8083, before),
		svc("kubernetes", "test2", "1.2.3.4", 8084, before),
		svc("test", "test2", "1.2.3.5", 8085, before),
		svc("test", "test2", "None", 8085, before),
		svc("test", "test2", "", 8085, before),
		svc("not-special", "default", "1.2.3.8", 8088, before),
		svc("not-special", "default", "None", 8088, before),
		svc("not-special", "default", "", 8088, before),
		svc("later", "test1", "1.2.3.9", 8089, start.Add(time.Second)),
	}
	yes, no := true, false
	master := links("KUBERNETES", "1.2.3.1", 8081)
	join := func(lists ...[]string) []string { return slices.Concat(lists...) }
	configMap := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "test-config-map", Namespace: "test1"},
		Data: map[string]string{"REPLACE_ME": "FROM_CONFIG_MAP", "DUPE_TEST": "CONFIG_MAP"}}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "test-secret", Namespace: "test1"},
		Data: map[string][]byte{"REPLACE_ME": []byte("FROM_SECRET"), "DUPE_TEST": []byte("SECRET")}}
	for _, c := range []struct {
		name      string
		ns        string
		links     *bool
		container corev1.Container
		podIPs    []string
		objects   bool // the ConfigMap and the Secret exist
		want      []string
		unset     []string
		err       string
	}{
		{name: "api server = N; kubelet = Y", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "FOO", Value: "BAZ"}}},
			want:      join([]string{"FOO=BAZ"}, master)},
		{name: "api server = N; kubelet = Y; service env vars", ns: "test1", links: &yes,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "FOO", Value: "BAZ"}}},
			want:      join([]string{"FOO=BAZ"}, links("TEST", "1.2.3.3", 8083), master)},
		{name: "api server = Y, kubelet = Y", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "FOO", Value: "BAR"}, {Name: "TEST_SERVICE_HOST", Value: "1.2.3.3"}}},
			want:      join([]string{"FOO=BAR", "TEST_SERVICE_HOST=1.2.3.3"}, master)},
		{name: "master service in pod ns", ns: "test2", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "FOO", Value: "ZAP"}}},
			want:      join([]string{"FOO=ZAP"}, master)},
		{name: "master service in pod ns, service env vars", ns: "test2", links: &yes,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "FOO", Value: "ZAP"}}},
			want:      join([]string{"FOO=ZAP"}, links("TEST", "1.2.3.5", 8085), links("KUBERNETES", "1.2.3.4", 8084))},
		{name: "pod in master service ns", ns: "default", links: &no, want: master},
		{name: "pod in master service ns, service env vars", ns: "default", links: &yes,
			want: join(links("NOT_SPECIAL", "1.2.3.8", 8088), master)},
		{name: "nil_enableServiceLinks (the API server defaults it to true)", ns: "test1",
			want: join(links("TEST", "1.2.3.3", 8083), master)},
		{name: "downward api pod", ns: "downward-api", links: &no, podIPs: []string{"1.2.3.4", "fd00::6"},
			container: corev1.Container{Env: []corev1.EnvVar{
				{Name: "POD_NAME", ValueFrom: field("metadata.name")}, {Name: "POD_NAMESPACE", ValueFrom: field("metadata.namespace")},
				{Name: "POD_NODE_NAME", ValueFrom: field("spec.nodeName")}, {Name: "POD_SERVICE_ACCOUNT_NAME", ValueFrom: field("spec.serviceAccountName")},
				{Name: "POD_IP", ValueFrom: field("status.podIP")}, {Name: "POD_IPS", ValueFrom: field("status.podIPs")},
				{Name: "HOST_IP", ValueFrom: field("status.hostIP")}, {Name: "HOST_IPS", ValueFrom: field("status.hostIPs")},
				{Name: "POD_UID", ValueFrom: field("metadata.uid")}, {Name: "APP", ValueFrom: field("metadata.labels['app']")},
				{Name: "NOTE", ValueFrom: field("metadata.annotations['note']")}, {Name: "LABELS", ValueFrom: field("metadata.labels")},
			}},
			want: join([]string{"POD_NAME=dapi-test-pod-name", "POD_NAMESPACE=downward-api", "POD_NODE_NAME=node-name", "POD_SERVICE_ACCOUNT_NAME=special",
				"POD_IP=1.2.3.4", "POD_IPS=1.2.3.4,fd00::6", "HOST_IP=127.0.0.1", "HOST_IPS=127.0.0.1,::1", "POD_UID=0f8e4b2c", "APP=web",
				"NOTE=hi", "LABELS=app=\"web\"\ntier=\"front\""}, master)},
		{name: "env expansion", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{
				{Name: "TEST_LITERAL", Value: "test-test-test"}, {Name: "POD_NAME", ValueFrom: field("metadata.name")},
				{Name: "OUT_OF_ORDER_TEST", Value: "$(OUT_OF_ORDER_TARGET)"}, {Name: "OUT_OF_ORDER_TARGET", Value: "FOO"},
				{Name: "EMPTY_VAR"}, {Name: "EMPTY_TEST", Value: "foo-$(EMPTY_VAR)"},
				{Name: "POD_NAME_TEST2", Value: "test2-$(POD_NAME)"}, {Name: "POD_NAME_TEST3", Value: "$(POD_NAME_TEST2)-3"},
				{Name: "LITERAL_TEST", Value: "literal-$(TEST_LITERAL)"}, {Name: "TEST_UNDEFINED", Value: "$(UNDEFINED_VAR)"},
			}},
			want: join([]string{"TEST_LITERAL=test-test-test", "POD_NAME=dapi-test-pod-name", "POD_NAME_TEST2=test2-dapi-test-pod-name",
				"POD_NAME_TEST3=test2-dapi-test-pod-name-3", "LITERAL_TEST=literal-test-test-test", "OUT_OF_ORDER_TEST=$(OUT_OF_ORDER_TARGET)",
				"OUT_OF_ORDER_TARGET=FOO", "TEST_UNDEFINED=$(UNDEFINED_VAR)", "EMPTY_VAR=", "EMPTY_TEST=foo-"}, master)},
		{name: "env expansion, service env vars", ns: "test1", links: &yes,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "SERVICE_VAR_TEST", Value: "$(TEST_SERVICE_HOST):$(TEST_SERVICE_PORT)"},
				{Name: "TEST_SERVICE_PORT", Value: "9999"}}},
			want: join([]string{"SERVICE_VAR_TEST=1.2.3.3:8083", "TEST_SERVICE_PORT=9999"}, slices.DeleteFunc(links("TEST", "1.2.3.3", 8083),
				func(s string) bool { return strings.HasPrefix(s, "TEST_SERVICE_PORT=") }), master)},
		{name: "configmapkeyref_missing_optional", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: cmKey("missing-config-map", "key", true)}}},
			want:      master},
		{name: "configmapkeyref_missing_key_optional", ns: "test1", links: &no, objects: true,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: cmKey("test-config-map", "key", true)}}},
			want:      master},
		{name: "secretkeyref_missing_optional", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: secretKey("missing-secret", "key", true)}}},
			want:      master},
		{name: "secretkeyref_missing_key_optional", ns: "test1", links: &no, objects: true,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: secretKey("test-secret", "key", true)}}},
			want:      master},
		{name: "an optional key missing leaves envFrom's value", ns: "test1", links: &no, objects: true,
			container: corev1.Container{EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "test-config-map"}}}},
				Env: []corev1.EnvVar{{Name: "DUPE_TEST", ValueFrom: secretKey("test-secret", "nothing", true)}}},
			want: join([]string{"DUPE_TEST=CONFIG_MAP", "REPLACE_ME=FROM_CONFIG_MAP"}, master)},
		{name: "configmap", ns: "test1", links: &no, objects: true,
			container: corev1.Container{
				EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "test-config-map"}}},
					{Prefix: "p_", ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "test-config-map"}}}},
				Env: []corev1.EnvVar{{Name: "TEST_LITERAL", Value: "test-test-test"}, {Name: "EXPANSION_TEST", Value: "$(REPLACE_ME)"}, {Name: "DUPE_TEST", Value: "ENV_VAR"}}},
			want: join([]string{"TEST_LITERAL=test-test-test", "REPLACE_ME=FROM_CONFIG_MAP", "EXPANSION_TEST=FROM_CONFIG_MAP", "DUPE_TEST=ENV_VAR",
				"p_REPLACE_ME=FROM_CONFIG_MAP", "p_DUPE_TEST=CONFIG_MAP"}, master)},
		{name: "secret", ns: "test1", links: &no, objects: true,
			container: corev1.Container{
				EnvFrom: []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "test-secret"}}},
					{Prefix: "p_", SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "test-secret"}}}},
				Env: []corev1.EnvVar{{Name: "TEST_LITERAL", Value: "test-test-test"}, {Name: "EXPANSION_TEST", Value: "$(REPLACE_ME)"}, {Name: "DUPE_TEST", Value: "ENV_VAR"}}},
			want: join([]string{"TEST_LITERAL=test-test-test", "REPLACE_ME=FROM_SECRET", "EXPANSION_TEST=FROM_SECRET", "DUPE_TEST=ENV_VAR",
				"p_REPLACE_ME=FROM_SECRET", "p_DUPE_TEST=SECRET"}, master)},
		{name: "configmap_missing", ns: "test1", links: &no,
			container: corev1.Container{EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "test-config-map"}}}}},
			err:       "mesh: the target's environment (envFrom of container app) needs ConfigMap test1/test-config-map, which does not exist (deleted since pod dapi-test-pod-name started?); the pod would not start again without it"},
		{name: "configmap_missing_optional", ns: "test1", links: &no,
			container: corev1.Container{EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{Optional: &yes, LocalObjectReference: corev1.LocalObjectReference{Name: "missing-config-map"}}}}},
			want:      master},
		{name: "secret_missing", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "TOKEN", ValueFrom: secretKey("test-secret", "TOKEN", false)}}},
			err:       "mesh: the target's environment (env TOKEN of container app) needs Secret test1/test-secret, which does not exist (deleted since pod dapi-test-pod-name started?); the pod would not start again without it"},
		{name: "secret_missing_optional", ns: "test1", links: &no,
			container: corev1.Container{EnvFrom: []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{Optional: &yes, LocalObjectReference: corev1.LocalObjectReference{Name: "missing-secret"}}}}},
			want:      master},
		{name: "a required key missing", ns: "test1", links: &no, objects: true,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "URL", ValueFrom: cmKey("test-config-map", "url", false)}}},
			err:       "mesh: the target's environment (env URL of container app) needs key url of ConfigMap test1/test-config-map, which has no such key (removed since pod dapi-test-pod-name started?); the pod would not start again without it"},
		{name: "a field the kubelet cannot extract", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "PHASE", ValueFrom: field("status.phase")}}},
			err:       "mesh: env PHASE of pod dapi-test-pod-name: unsupported fieldPath: status.phase"},
		{name: "a subscript on a field without keys", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "X", ValueFrom: field("spec.nodeName['x']")}}},
			err:       "mesh: env X of pod dapi-test-pod-name: field label does not support subscript: spec.nodeName['x']"},
		{name: "resources: requests, limits, the node's allocatable for a limit not set, divisors", ns: "test1", links: &no,
			container: corev1.Container{
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{"cpu": resource.MustParse("250m"), "memory": resource.MustParse("64Mi")},
					Limits: corev1.ResourceList{"memory": resource.MustParse("128Mi")}},
				Env: []corev1.EnvVar{
					{Name: "CPU_REQUEST", ValueFrom: limit("requests.cpu", "", "")}, {Name: "CPU_REQUEST_M", ValueFrom: limit("requests.cpu", "", "1m")},
					{Name: "MEM_LIMIT_MI", ValueFrom: limit("limits.memory", "", "1Mi")}, {Name: "CPU_LIMIT", ValueFrom: limit("limits.cpu", "", "")},
					{Name: "STORAGE_LIMIT_GI", ValueFrom: limit("limits.ephemeral-storage", "", "1Gi")},
					{Name: "SIDE_MEM_LIMIT", ValueFrom: limit("limits.memory", "side", "")},
				}},
			want: join([]string{"CPU_REQUEST=1", "CPU_REQUEST_M=250", "MEM_LIMIT_MI=128", "CPU_LIMIT=4", "STORAGE_LIMIT_GI=20", "SIDE_MEM_LIMIT=8589934592"}, master)},
		{name: "an unsupported resource", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "GPU", ValueFrom: limit("limits.nvidia.com/gpu", "", "")}}},
			err:       "mesh: env GPU of pod dapi-test-pod-name: unsupported container resource : limits.nvidia.com/gpu"},
		{name: "fileKeyRef: read inside the pod", ns: "test1", links: &no,
			container: corev1.Container{Env: []corev1.EnvVar{{Name: "FROM_FILE", ValueFrom: &corev1.EnvVarSource{FileKeyRef: &corev1.FileKeySelector{VolumeName: "config", Path: "app.env", Key: "URL"}}}}},
			want:      master,
			unset:     []string{"FROM_FILE (fileKeyRef: key URL of app.env in volume config, read inside the pod)"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "dapi-test-pod-name", Namespace: c.ns, UID: "0f8e4b2c",
					Labels: map[string]string{"app": "web", "tier": "front"}, Annotations: map[string]string{"note": "hi"}},
				Spec: corev1.PodSpec{ServiceAccountName: "special", NodeName: "node-name", EnableServiceLinks: c.links,
					Containers: []corev1.Container{c.container, {Name: "side"}}},
				Status: corev1.PodStatus{HostIPs: []corev1.HostIP{{IP: "127.0.0.1"}, {IP: "::1"}}},
			}
			pod.Spec.Containers[0].Name = "app"
			for _, ip := range c.podIPs {
				pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: ip})
			}
			in := envInput{pod: pod, container: &pod.Spec.Containers[0], services: services, started: start,
				allocatable: corev1.ResourceList{"cpu": resource.MustParse("3500m"), "memory": resource.MustParse("8Gi"), "ephemeral-storage": resource.MustParse("20Gi")}}
			if c.objects {
				in.configMaps = map[string]*corev1.ConfigMap{configMap.Name: configMap}
				in.secrets = map[string]*corev1.Secret{secret.Name: secret}
			}
			vars, unset, err := in.environment()
			if c.err != "" {
				if err == nil || err.Error() != c.err {
					t.Fatalf("error %v\nwant  %s", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for k, v := range vars {
				got = append(got, k+"="+v)
			}
			sort.Strings(got)
			want := slices.Clone(c.want)
			sort.Strings(want)
			if !slices.Equal(got, want) {
				t.Errorf("environment\n got %q\nwant %q", got, want)
			}
			if !slices.Equal(unset, c.unset) {
				t.Errorf("unset %q, want %q", unset, c.unset)
			}
		})
	}
}

// Pod-level limits come before the node's allocatable as a container's default
// (kubelet_resources.go defaultPodLimitsForDownwardAPI).
func TestEnvironmentPodLevelLimits(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns"}, Spec: corev1.PodSpec{
		Resources:  &corev1.ResourceRequirements{Limits: corev1.ResourceList{"cpu": resource.MustParse("2")}},
		Containers: []corev1.Container{{Name: "app", Env: []corev1.EnvVar{{Name: "CPU", ValueFrom: limit("limits.cpu", "", "")}, {Name: "MEM", ValueFrom: limit("limits.memory", "", "1Mi")}}}}}}
	in := envInput{pod: pod, container: &pod.Spec.Containers[0], allocatable: corev1.ResourceList{"cpu": resource.MustParse("8"), "memory": resource.MustParse("1Gi")}}
	vars, _, err := in.environment()
	if err != nil || vars["CPU"] != "2" || vars["MEM"] != "1024" {
		t.Fatalf("got %v %v, want CPU=2 MEM=1024", vars, err)
	}
	if !needsAllocatable(pod, &pod.Spec.Containers[0]) {
		t.Error("needsAllocatable: false for limits the container does not set")
	}
}

// Only a Running pod, not being deleted, a Ready one first; one line saying why otherwise.
func TestRunningPod(t *testing.T) {
	pod := func(name string, phase corev1.PodPhase, ready bool, deleting bool) corev1.Pod {
		p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.PodStatus{Phase: phase}}
		if ready {
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
		}
		if deleting {
			now := metav1.Now()
			p.DeletionTimestamp = &now
		}
		return p
	}
	got, err := runningPod([]corev1.Pod{pod("a", corev1.PodRunning, false, false), pod("b", corev1.PodRunning, true, false), pod("c", corev1.PodRunning, true, true)}, "svc/web in shop", "kubectl")
	if err != nil || got.Name != "b" {
		t.Fatalf("got %v %v, want b (Running, Ready, not terminating)", got, err)
	}
	crash := pod("b", corev1.PodPending, false, false)
	crash.Status.ContainerStatuses = []corev1.ContainerStatus{{State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ImagePullBackOff"}}}}
	for _, c := range []struct {
		pods []corev1.Pod
		want string
	}{
		{nil, "mesh: svc/web in shop has no pods: its environment is the kubelet's, made for a running container; start its workload (kubectl get pods -n shop -l app=web)"},
		{[]corev1.Pod{pod("a", corev1.PodSucceeded, false, false), crash, pod("c", corev1.PodRunning, true, true)},
			"mesh: no Running pod of svc/web in shop (c Running, terminating, a Succeeded, b Pending (ImagePullBackOff)): its environment is the kubelet's, made for a running container; kubectl get pods -n shop -l app=web shows why"},
	} {
		if _, err := runningPod(c.pods, "svc/web in shop", "kubectl get pods -n shop -l app=web"); err == nil || err.Error() != c.want {
			t.Errorf("error %v\nwant  %s", err, c.want)
		}
	}
}
