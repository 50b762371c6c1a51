package mesh

import (
	"regexp"
	"strings"

	"k8s.io/apimachinery/pkg/runtime/schema"
)

// PodOptions shape the waypoint's pods. The zero value is the default: DefaultResources, no
// PodMonitor. The pods always carry the prometheus.io scrape annotations.
type PodOptions struct {
	Resources Resources // "" fields take DefaultResources'
	// PodMonitor adds a Prometheus Operator PodMonitor scraping the health port's /metrics.
	PodMonitor bool
}

// Resources are the waypoint container's requests and limits (Kubernetes quantities).
type Resources struct {
	RequestsCPU, RequestsMemory, LimitsCPU, LimitsMemory string
}

// DefaultResources are sized from BENCHMARKS.md ("install: the waypoint's requests and
// limits"): a healthy waypoint under load peaks at 42-51 MB RSS and holds an idle proxied stream
// in ~17 KB; inspected HTTP costs 0.078 vCPU per 1000 req/s and one core forwards ~1.3 GB/s.
// 100m and 128Mi is ~1300 req/s and ~4000 idle streams guaranteed; 2 CPUs and 512Mi (~26000 idle
// streams) is where a replica stops growing and another is the answer.
var DefaultResources = Resources{RequestsCPU: "100m", RequestsMemory: "128Mi", LimitsCPU: "2", LimitsMemory: "512Mi"}

// MetricsPort and MetricsPath are where the waypoint serves Prometheus metrics (the health
// listener).
const (
	MetricsPort = 15021
	MetricsPath = "/metrics"
)

var gvrPodMonitor = schema.GroupVersionResource{Group: "monitoring.coreos.com", Version: "v1", Resource: "podmonitors"}

func (p PodOptions) resources() map[string]any {
	r, d := p.Resources, DefaultResources
	pick := func(v, def string) string {
		if v == "" {
			return def
		}
		return v
	}
	return map[string]any{
		"requests": map[string]any{"cpu": pick(r.RequestsCPU, d.RequestsCPU), "memory": pick(r.RequestsMemory, d.RequestsMemory)},
		"limits":   map[string]any{"cpu": pick(r.LimitsCPU, d.LimitsCPU), "memory": pick(r.LimitsMemory, d.LimitsMemory)},
	}
}

func (p PodOptions) annotations() map[string]any {
	return map[string]any{"prometheus.io/scrape": "true", "prometheus.io/port": "15021", "prometheus.io/path": MetricsPath}
}

// podMonitor is the PodMonitor object, if asked for.
func (p PodOptions) podMonitor(meta map[string]any, name string) []Object {
	if !p.PodMonitor {
		return nil
	}
	return []Object{{gvrPodMonitor, map[string]any{
		"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta,
		"spec": map[string]any{
			"selector":            map[string]any{"matchLabels": map[string]any{"app.kubernetes.io/name": name}},
			"podMetricsEndpoints": []any{map[string]any{"port": "health", "path": MetricsPath}},
		}}}}
}

func (in *Installer) replicas() int {
	if in.Replicas <= 0 {
		return 2
	}
	return in.Replicas
}

// versioned adds VersionLabel to a Deployment's metadata.
func (in *Installer) versioned(meta map[string]any) map[string]any {
	if in.Version != "" {
		meta["labels"].(map[string]any)[VersionLabel] = in.Version
	}
	return meta
}

// release is a published version: vMAJOR.MINOR.PATCH with an optional pre-release without
// hyphens (v1.2.0-rc.1), never a `git describe` between tags (v1.2.0-3-gabc1234) nor -dirty.
var release = regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.]+)?$`)

// ImageRepository is where release images are published.
const ImageRepository = "ghcr.io/detour-mesh/detour"

// ReleaseImage is the published image of a detour version, or "" when version is not a release
// (a development build: nothing was published under its name).
func ReleaseImage(version string) string {
	if !release.MatchString(version) || strings.HasSuffix(version, "dirty") {
		return ""
	}
	return ImageRepository + ":" + version
}
