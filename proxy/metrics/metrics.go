// Package metrics holds the waypoint's Prometheus metrics: Istio's standard TCP and request metrics with
// reporter="waypoint" (so existing dashboards see detour as they see Istio's waypoint) and
// detour's own. Collectors are registered on the registry the caller passes: no globals.
package metrics

import (
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Labels on Istio's TCP metrics, as Istio names them and in the order ztunnel reports them
// (ztunnel src/proxy/metrics.rs, CommonTrafficLabels), so dashboards and Kiali's queries
// (tests/integration/ambient/baseline_test.go buildQuery/buildL4Query) group detour as they
// group Envoy's waypoint.
var streamLabels = []string{"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision",
	"destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
	"destination_cluster", "request_protocol", "response_flags", "connection_security_policy"}

// Metrics are the waypoint's collectors. A nil *Metrics records nothing.
type Metrics struct {
	Opened    *prometheus.CounterVec   // istio_tcp_connections_opened_total
	Closed    *prometheus.CounterVec   // istio_tcp_connections_closed_total
	Received  *prometheus.CounterVec   // istio_tcp_received_bytes_total: client to service
	Sent      *prometheus.CounterVec   // istio_tcp_sent_bytes_total: service to client
	Active    prometheus.Gauge         // detour_streams_active
	Decisions *prometheus.CounterVec   // detour_authz_decisions_total{decision, policy}
	DryRun    *prometheus.CounterVec   // detour_authz_dry_run_decisions_total{decision, policy}: never enforced
	Sessions  *prometheus.GaugeVec     // detour_sessions_active{mode}
	Taken     *prometheus.CounterVec   // detour_session_taken_total{mode, kind}: streams and requests sent to developers
	Dropped   prometheus.Counter       // detour_mirror_dropped_total: mirror copies lost to slow developers
	Requests  *prometheus.CounterVec   // istio_requests_total: HTTP requests parsed at the waypoint
	Durations *prometheus.HistogramVec // istio_request_duration_milliseconds
	// Unsupported is detour_unsupported_config{kind, namespace, name}: 1 for each Istio object
	// that would apply to a bound service and that detour does not implement (not applied).
	Unsupported *prometheus.GaugeVec
	// Sniffing is detour_sniffing_streams: streams waiting now for the client bytes that decide
	// their protocol (Envoy's listener stat downstream_pre_cx_active).
	Sniffing prometheus.Gauge
	// SniffRefused is detour_sniff_refused_total{reason}: streams refused while deciding their
	// protocol; reason "timeout" (the wait ran out: Envoy's downstream_pre_cx_timeout) or
	// "limit" (their client already had as many streams waiting as allowed).
	SniffRefused *prometheus.CounterVec
}

// Config names one configuration object.
type Config struct{ Kind, Namespace, Name string }

// Labels on Istio's request metrics.
var requestLabels = append(append([]string{}, streamLabels...), "response_code", "grpc_response_status")

// New creates the collectors and registers them on reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Opened:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total", Help: "TCP connections (HBONE streams) opened."}, streamLabels),
		Closed:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total", Help: "TCP connections (HBONE streams) closed."}, streamLabels),
		Received: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total", Help: "Bytes received from the client (request direction)."}, streamLabels),
		Sent:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total", Help: "Bytes sent to the client (response direction)."}, streamLabels),
		Active:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_streams_active", Help: "Streams being forwarded now."}),
		Decisions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_authz_decisions_total", Help: "AuthorizationPolicy decisions."},
			[]string{"decision", "policy"}),
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total", Help: "HTTP requests (parsed at the waypoint)."}, requestLabels),
		Durations: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_duration_milliseconds", Help: "HTTP request duration, until the response ends.",
			// Istio's buckets.
			Buckets: []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}}, requestLabels),
	}
	m.Sessions = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "detour_sessions_active", Help: "Debug sessions registered now."}, []string{"mode"})
	m.Taken = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_session_taken_total", Help: "Streams and requests sent to developers (stolen or mirrored)."}, []string{"mode", "kind"})
	m.Dropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_mirror_dropped_total", Help: "Mirror copies (requests or streams) lost because the developer was slow, stalled or gone."})
	m.DryRun = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_authz_dry_run_decisions_total",
		Help: "What dry-run AuthorizationPolicies (istio.io/dry-run) would have decided; never enforced."}, []string{"decision", "policy"})
	m.Unsupported = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "detour_unsupported_config",
		Help: "Istio objects that would apply to services bound to this waypoint and that detour does not implement (1 each; not applied)."},
		[]string{"kind", "namespace", "name"})
	m.Sniffing = prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_sniffing_streams",
		Help: "Streams waiting now for the client bytes that decide their protocol."})
	m.SniffRefused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_sniff_refused_total",
		Help: "Streams refused while deciding their protocol: timeout (the wait ran out) or limit (their client had as many waiting as allowed)."},
		[]string{"reason"})
	reg.MustRegister(m.DryRun, m.Unsupported, m.Sniffing, m.SniffRefused)
	reg.MustRegister(m.Opened, m.Closed, m.Received, m.Sent, m.Active, m.Decisions, m.Requests, m.Durations, m.Sessions, m.Taken, m.Dropped)
	return m
}

// Peer is one end of a stream as Istio's labels describe it. An empty field is reported as
// "unknown", as Istio does.
type Peer struct {
	Workload, Namespace string // the workload (Deployment, ...) and its namespace
	Principal           string // spiffe://...
	App, Version        string // the pod's app and version labels
	CanonicalService    string
	CanonicalRevision   string
	Cluster             string
}

// Stream is one forwarded stream's labels: who sent it, the service it was addressed to, and the
// workload that served it (the developer's, "unknown", when a session took it).
type Stream struct {
	Source, Destination Peer
	Service             string // the service's hostname (destination_service)
	ServiceName         string
	ServiceNamespace    string
	// Flags are Envoy's response flags of a stream the waypoint refused itself (NR: no route
	// takes it, NC: its route's backend does not exist, UH: no ready endpoint); "" is "-". A
	// request's flags are its own (Request.Flags).
	Flags string
}

func unknown(v string) string {
	if v == "" {
		return "unknown"
	}
	return v
}

func (s Stream) values(protocol, flags string, extra int) []string {
	if flags == "" {
		flags = "-"
	}
	v := make([]string, 0, len(streamLabels)+extra)
	src, dst := s.Source, s.Destination
	return append(v, "waypoint",
		unknown(src.Workload), unknown(src.CanonicalService), unknown(src.CanonicalRevision), unknown(src.Namespace),
		unknown(src.Principal), unknown(src.App), unknown(src.Version), unknown(src.Cluster),
		unknown(s.Service), unknown(s.ServiceNamespace), unknown(s.ServiceName),
		unknown(dst.Workload), unknown(dst.CanonicalService), unknown(dst.CanonicalRevision),
		unknown(dst.Namespace), unknown(dst.Principal), unknown(dst.App), unknown(dst.Version),
		unknown(dst.Cluster), protocol, flags, "mutual_tls")
}

// SetUnsupported replaces the objects detour_unsupported_config reports.
func (m *Metrics) SetUnsupported(objs []Config) {
	if m == nil {
		return
	}
	m.Unsupported.Reset()
	for _, o := range objs {
		m.Unsupported.WithLabelValues(o.Kind, o.Namespace, o.Name).Set(1)
	}
}

// StreamOpened records a stream accepted for forwarding (or, with s.Flags, one the waypoint
// refused: opened and closed at once, as Envoy counts a connection its tcp_proxy closes) and
// returns what records its end.
func (m *Metrics) StreamOpened(s Stream) StreamEnd {
	if m == nil {
		return StreamEnd{}
	}
	v := s.values("tcp", s.Flags, 0)
	m.Opened.WithLabelValues(v...).Inc()
	m.Active.Inc()
	return StreamEnd{m: m, closed: m.Closed.WithLabelValues(v...), received: m.Received.WithLabelValues(v...), sent: m.Sent.WithLabelValues(v...)}
}

// StreamEnd records one open stream's end: the series of its labels, looked up when it opened,
// so that an open stream holds three counters instead of its labels (an idle stream's memory,
// BENCHMARKS.md). Its closed and byte series therefore exist, at 0, from the stream's start.
// The zero StreamEnd records nothing.
type StreamEnd struct {
	m                      *Metrics
	closed, received, sent prometheus.Counter
}

// Closed records the stream's end and the bytes it moved.
func (e StreamEnd) Closed(received, sent int64) {
	if e.m == nil {
		return
	}
	e.closed.Inc()
	e.received.Add(float64(received))
	e.sent.Add(float64(sent))
	e.m.Active.Dec()
}

// Decision records an authorization decision.
// ShadowDecision counts what a dry-run policy would have decided ("namespace/name: allow|deny",
// as authz.Decision.DryRun lists it).
func (m *Metrics) ShadowDecision(outcome string) {
	if m == nil {
		return
	}
	policy, d, _ := strings.Cut(outcome, ": ")
	m.DryRun.WithLabelValues(d, policy).Inc()
}

func (m *Metrics) Decision(allow bool, policy string) {
	if m == nil {
		return
	}
	d := "deny"
	if allow {
		d = "allow"
	}
	m.Decisions.WithLabelValues(d, policy).Inc()
}

// Request is one HTTP request's outcome.
type Request struct {
	Protocol   string // http or grpc
	Code       int    // the response status sent to the client
	GRPCStatus string // "" when not gRPC
	// Flags are Envoy's response flags for what the waypoint did itself: UF (upstream connect
	// failure), UH (no healthy upstream), DC (downstream closed), "-" when none.
	Flags    string
	Duration time.Duration
}

// RequestDone records an HTTP request.
func (m *Metrics) RequestDone(s Stream, r Request) {
	if m == nil {
		return
	}
	v := append(s.values(r.Protocol, r.Flags, 2), strconv.Itoa(r.Code), r.GRPCStatus)
	m.Requests.WithLabelValues(v...).Inc()
	m.Durations.WithLabelValues(v...).Observe(float64(r.Duration) / float64(time.Millisecond))
}

// SessionStarted and SessionEnded track live debug sessions.
func (m *Metrics) SessionStarted(mode string) {
	if m != nil {
		m.Sessions.WithLabelValues(mode).Inc()
	}
}

func (m *Metrics) SessionEnded(mode string) {
	if m != nil {
		m.Sessions.WithLabelValues(mode).Dec()
	}
}

// SessionTook counts a stream or request sent to a developer.
func (m *Metrics) SessionTook(mode, kind string) {
	if m != nil {
		m.Taken.WithLabelValues(mode, kind).Inc()
	}
}

// SniffStarted and SniffEnded track the streams waiting for their first bytes.
func (m *Metrics) SniffStarted() {
	if m != nil {
		m.Sniffing.Inc()
	}
}

func (m *Metrics) SniffEnded() {
	if m != nil {
		m.Sniffing.Dec()
	}
}

// SniffRefusal counts a stream refused while deciding its protocol (reason: timeout, limit).
func (m *Metrics) SniffRefusal(reason string) {
	if m != nil {
		m.SniffRefused.WithLabelValues(reason).Inc()
	}
}

// MirrorDropped counts a lost mirror copy.
func (m *Metrics) MirrorDropped() {
	if m != nil {
		m.Dropped.Inc()
	}
}

// Sum adds up the samples of c's series whose labels include every pair of match (counters,
// gauges and histogram counts): a subset query, as a PromQL selector names only the labels it
// cares about.
func Sum(c prometheus.Collector, match map[string]string) float64 {
	ch := make(chan prometheus.Metric, 64)
	go func() { c.Collect(ch); close(ch) }()
	var total float64
	for m := range ch {
		var pb dto.Metric
		if m.Write(&pb) != nil {
			continue
		}
		n := 0
		for _, lp := range pb.GetLabel() {
			if v, ok := match[lp.GetName()]; ok && v == lp.GetValue() {
				n++
			}
		}
		if n != len(match) {
			continue
		}
		switch {
		case pb.Counter != nil:
			total += pb.Counter.GetValue()
		case pb.Gauge != nil:
			total += pb.Gauge.GetValue()
		case pb.Histogram != nil:
			total += float64(pb.Histogram.GetSampleCount())
		}
	}
	return total
}
