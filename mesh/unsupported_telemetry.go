package mesh

import (
	"fmt"
	"strings"

	telemetryapi "istio.io/api/telemetry/v1alpha1"
	typev1beta1 "istio.io/api/type/v1beta1"
	telemetryv1 "istio.io/client-go/pkg/apis/telemetry/v1"
)

// telemetryDiffers is what a Telemetry asks of a waypoint beyond what detour does by default,
// "" when nothing: detour exports Istio's standard metrics to Prometheus with Istio's labels,
// reports no trace spans (it passes trace headers on untouched) and writes its own access log.
// Beyond that default is:
//   - a tracing entry, unless it sets disableSpanReporting (no spans: as detour);
//   - an accessLogging entry, unless it sets disabled (detour's own log stays);
//   - a metrics entry naming a provider other than prometheus, with overrides (disabled
//     metrics, tag overrides) or a reportingInterval.
//
// An entry with nothing but the defaults (an empty metrics entry, providers [prometheus]) is
// not reported.
func telemetryDiffers(spec *telemetryapi.Telemetry) string {
	var out []string
	for _, t := range spec.GetTracing() {
		if !t.GetDisableSpanReporting().GetValue() {
			out = append(out, "tracing"+providers(t.GetProviders())+" is not done (detour reports no spans)")
			break
		}
	}
	for _, a := range spec.GetAccessLogging() {
		if !a.GetDisabled().GetValue() {
			out = append(out, "access logging"+providers(a.GetProviders())+" is not done (detour writes its own access log)")
			break
		}
	}
	for _, m := range spec.GetMetrics() {
		var what []string
		for _, p := range m.GetProviders() {
			if p.GetName() != "prometheus" {
				what = append(what, "provider "+p.GetName())
			}
		}
		if len(m.GetOverrides()) > 0 {
			what = append(what, "overrides")
		}
		if m.GetReportingInterval() != nil {
			what = append(what, "reportingInterval")
		}
		if len(what) > 0 {
			out = append(out, "metrics "+strings.Join(what, ", ")+" not applied (detour exports Istio's standard metrics to Prometheus, labels unchanged)")
			break
		}
	}
	return strings.Join(out, "; ")
}

func providers(ps []*telemetryapi.ProviderRef) string {
	if len(ps) == 0 {
		return " (the mesh's default provider)"
	}
	names := make([]string, 0, len(ps))
	for _, p := range ps {
		names = append(names, p.GetName())
	}
	return fmt.Sprintf(" (%s)", strings.Join(names, ", "))
}

// telemetryRefs are a Telemetry's targetRefs, or its one targetRef.
func telemetryRefs(o *telemetryv1.Telemetry) []*typev1beta1.PolicyTargetReference {
	refs := o.Spec.GetTargetRefs()
	if len(refs) == 0 && o.Spec.GetTargetRef() != nil {
		refs = []*typev1beta1.PolicyTargetReference{o.Spec.GetTargetRef()}
	}
	return refs
}
