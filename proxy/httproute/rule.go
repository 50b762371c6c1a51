package httproute

import (
	"net/http"
	"time"
)

// Rule is what a matched rule does with a request: a redirect, or forwarding to one of its
// weighted backends (after its request filters), with its mirrors, timeouts and retry.
// Immutable once compiled.
type Rule struct {
	Route string // kind/namespace/name#rule, for logs
	GRPC  bool   // from a GRPCRoute

	RequestHeaders  *HeaderMod // nil: none
	ResponseHeaders *HeaderMod
	Redirect        *RedirectAction // set: answer with it, forward nothing
	Rewrite         *RewriteAction
	CORS            *CORSAction // preflights answered, CORS response headers set
	Mirrors         []MirrorAction
	Backends        []Backend
	// Timeout bounds the whole request (timeouts.request); BackendTimeout each try
	// (timeouts.backendRequest, Istio's per-try timeout when retries are set). 0: none.
	Timeout, BackendTimeout time.Duration
	Retry                   *RetryPolicy

	totalWeight int
}

// Backend is one weighted backendRef.
type Backend struct {
	Namespace, Name string
	Port            uint16
	Weight          int
	RequestHeaders  *HeaderMod // the backendRef's own filters, after the rule's
	ResponseHeaders *HeaderMod
	// Invalid says why the backendRef cannot be used (not a Service, not found, no port): the
	// requests it is picked for get 500, as the spec asks.
	Invalid string
}

// MirrorAction copies Numerator/Denominator of the requests to a Service.
type MirrorAction struct {
	Namespace, Name        string
	Port                   uint16
	Numerator, Denominator int
	Invalid                string // the mirror's Service is not known: no copy is sent
}

// RetryPolicy: retry up to Attempts more times on the listed codes (Istio's retryOn
// "retriable-status-codes", or its defaults connect-failure,refused-stream,unavailable,
// cancelled,retriable-status-codes with 503 when Codes is empty), Backoff between tries.
type RetryPolicy struct {
	Attempts int
	Codes    []int
	Backoff  time.Duration
}

// Retriable reports whether a response with code may be tried again.
func (p *RetryPolicy) Retriable(code int) bool {
	if len(p.Codes) == 0 {
		return code == http.StatusServiceUnavailable
	}
	for _, c := range p.Codes {
		if c == code {
			return true
		}
	}
	return false
}

// Pick draws a backend by weight with intn (math/rand/v2.IntN, injectable for tests); nil when
// no backend has a weight (the spec's 500).
func (r *Rule) Pick(intn func(int) int) *Backend {
	if r.totalWeight <= 0 {
		return nil
	}
	n := intn(r.totalWeight)
	for i := range r.Backends {
		b := &r.Backends[i]
		if n < b.Weight {
			return b
		}
		n -= b.Weight
	}
	return nil
}

// Mirrored reports whether mirror m takes this request, drawing with intn.
func (m *MirrorAction) Mirrored(intn func(int) int) bool {
	if m.Invalid != "" || m.Numerator <= 0 {
		return false
	}
	return m.Numerator >= m.Denominator || intn(m.Denominator) < m.Numerator
}
