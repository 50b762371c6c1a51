package mesh

import (
	"fmt"
	"strings"

	"sigs.k8s.io/yaml"
)

// The chart's values, each standing in Objects for a sentinel that ChartFiles replaces by the
// template expression: the chart renders what Install applies for the same values.
var chartValues = []struct{ sentinel, expr string }{
	{"x-detour-root-namespace-x", "{{ .Values.rootNamespace }}"},
	{"x-detour-namespace-x", "{{ .Release.Namespace }}"},
	{"x-detour-name-x", "{{ .Values.name }}"},
	{"x-detour-image-x", `{{ .Values.image | default (printf "%s:%s" "` + ImageRepository + `" .Chart.AppVersion) | quote }}`},
	{"x-detour-version-x", "{{ .Chart.AppVersion | quote }}"},
	{"987654321", "{{ .Values.replicas }}"},
	{"x-requests-cpu-x", "{{ .Values.resources.requests.cpu | quote }}"},
	{"x-requests-memory-x", "{{ .Values.resources.requests.memory | quote }}"},
	{"x-limits-cpu-x", "{{ .Values.resources.limits.cpu | quote }}"},
	{"x-limits-memory-x", "{{ .Values.resources.limits.memory | quote }}"},
}

// ChartDir is the chart's directory in the repository.
const ChartDir = "charts/detour"

const chartHeader = "# Generated from mesh.Installer by `make chart`; do not edit.\n"

// ChartFiles is the Helm chart of Objects (path under ChartDir -> content): one template per
// object, the DebugSession CRD under crds/ (Helm installs it first and never deletes it; detour
// uninstall removes it with the last installation), and the values: name, image (default the
// chart's appVersion's release image), replicas, resources, podMonitor, rootNamespace (the
// mesh config's Role and RoleBinding go there). The release process sets the chart's version
// and appVersion (helm package --version --app-version).
func ChartFiles() (map[string][]byte, error) {
	in := &Installer{Namespace: "x-detour-namespace-x", Name: "x-detour-name-x", Image: "x-detour-image-x", Version: "x-detour-version-x",
		RootNamespace: "x-detour-root-namespace-x",
		Replicas:      987654321, Pod: PodOptions{PodMonitor: true, Resources: Resources{
			RequestsCPU: "x-requests-cpu-x", RequestsMemory: "x-requests-memory-x", LimitsCPU: "x-limits-cpu-x", LimitsMemory: "x-limits-memory-x"}}}
	files := map[string][]byte{
		"Chart.yaml":         []byte(chartYAML),
		"values.yaml":        []byte(chartHeader + valuesYAML()),
		"values.schema.json": []byte(valuesSchema),
	}
	for _, o := range in.Objects() {
		b, err := yaml.Marshal(o.Body)
		if err != nil {
			return nil, fmt.Errorf("mesh: chart: %w", err)
		}
		kind := o.Body["kind"].(string)
		if o.Resource == gvrCRD {
			files["crds/"+o.Body["metadata"].(map[string]any)["name"].(string)+".yaml"] = b
			continue
		}
		text := string(b)
		for _, v := range chartValues {
			text = strings.ReplaceAll(text, v.sentinel, v.expr)
		}
		text = chartHeader + text
		if o.Resource == gvrPodMonitor {
			text = "{{- if .Values.podMonitor }}\n" + text + "{{- end }}\n"
		}
		file := strings.ToLower(kind)
		if ns, _ := objectNamespace(o); ns == in.RootNamespace {
			file = "meshconfig-" + file // the mesh config's Role and RoleBinding, in the root namespace
		}
		files["templates/"+file+".yaml"] = []byte(text)
	}
	return files, nil
}

const chartYAML = `# Generated from mesh.Installer by ` + "`make chart`" + `; do not edit.
apiVersion: v2
name: detour
description: detour as an Istio ambient waypoint in one namespace (what detour install applies)
type: application
version: 0.0.0-dev
appVersion: dev
home: https://github.com/detour-mesh/detour
sources:
  - https://github.com/detour-mesh/detour
keywords: [istio, ambient, waypoint, hbone, debugging]
kubeVersion: ">=1.29.0-0"
`

func valuesYAML() string {
	d := DefaultResources
	return fmt.Sprintf(`# The waypoint's name: its Gateway, Service, Deployment and ServiceAccount.
name: detour
# The detour image; "" is %s:<the chart's appVersion>.
image: ""
# Replicas share their debug sessions.
replicas: 2
# Sized from BENCHMARKS.md ("install: the waypoint's requests and limits").
resources:
  requests:
    cpu: %s
    memory: %s
  limits:
    cpu: %q
    memory: %s
# A Prometheus Operator PodMonitor for /metrics on port 15021 (the pods carry prometheus.io
# scrape annotations either way).
podMonitor: false
# istiod's root namespace: the waypoint reads its mesh config there (the istio ConfigMap's
# extensionProviders, which CUSTOM AuthorizationPolicies name), with a Role for that alone.
rootNamespace: istio-system
`, ImageRepository, d.RequestsCPU, d.RequestsMemory, d.LimitsCPU, d.LimitsMemory)
}

// valuesSchema refuses unknown and mistyped values (helm install, template and lint check it).
const valuesSchema = `{
  "$schema": "https://json-schema.org/draft-07/schema#",
  "type": "object",
  "additionalProperties": false,
  "required": ["name", "image", "replicas", "resources", "podMonitor", "rootNamespace"],
  "properties": {
    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "rootNamespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "image": {"type": "string"},
    "replicas": {"type": "integer", "minimum": 1},
    "podMonitor": {"type": "boolean"},
    "resources": {
      "type": "object",
      "additionalProperties": false,
      "required": ["requests", "limits"],
      "properties": {
        "requests": {"$ref": "#/definitions/quantities"},
        "limits": {"$ref": "#/definitions/quantities"}
      }
    }
  },
  "definitions": {
    "quantities": {
      "type": "object",
      "additionalProperties": false,
      "required": ["cpu", "memory"],
      "properties": {"cpu": {"type": "string"}, "memory": {"type": "string"}}
    }
  }
}
`
