// Package metrics holds the waypoint's Prometheus metrics: Istio's standard TCP and request metrics with
// reporter="waypoint" (so existing dashboards see detour as they see Istio's waypoint) and
// detour's own. Collectors are registered on the registry the caller passes: no globals.
package metrics

import (
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Labels on Istio's metrics, as Istio names them.
var streamLabels = []string{"reporter", "source_principal", "destination_service", "destination_service_namespace", "connection_security_policy"}

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
}

// Labels on Istio's request metrics.
var requestLabels = append(append([]string{}, streamLabels...), "request_protocol", "response_code", "grpc_response_status", "response_flags")

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
	reg.MustRegister(m.DryRun)
	reg.MustRegister(m.Opened, m.Closed, m.Received, m.Sent, m.Active, m.Decisions, m.Requests, m.Durations, m.Sessions, m.Taken, m.Dropped)
	return m
}

// Stream is one forwarded stream's labels.
type Stream struct {
	SourcePrincipal, Service, ServiceNamespace string
}

func (s Stream) values() []string {
	return []string{"waypoint", s.SourcePrincipal, s.Service, s.ServiceNamespace, "mutual_tls"}
}

// StreamOpened records a stream accepted for forwarding.
func (m *Metrics) StreamOpened(s Stream) {
	if m == nil {
		return
	}
	m.Opened.WithLabelValues(s.values()...).Inc()
	m.Active.Inc()
}

// StreamClosed records its end and the bytes it moved.
func (m *Metrics) StreamClosed(s Stream, received, sent int64) {
	if m == nil {
		return
	}
	v := s.values()
	m.Closed.WithLabelValues(v...).Inc()
	m.Received.WithLabelValues(v...).Add(float64(received))
	m.Sent.WithLabelValues(v...).Add(float64(sent))
	m.Active.Dec()
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
	flags := r.Flags
	if flags == "" {
		flags = "-"
	}
	v := append(s.values(), r.Protocol, strconv.Itoa(r.Code), r.GRPCStatus, flags)
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

// MirrorDropped counts a lost mirror copy.
func (m *Metrics) MirrorDropped() {
	if m != nil {
		m.Dropped.Inc()
	}
}
