package authn

import (
	"errors"
	"net/http"
)

// The statuses Envoy's jwt_authn answers with (jwt_verify_lib status.cc), as the body of its
// local reply; the ones detour produces.
const (
	StatusMissing          = "Jwt is missing"
	StatusExpired          = "Jwt is expired"
	StatusNotYetValid      = "Jwt not yet valid"
	StatusBadFormat        = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
	StatusUnknownIssuer    = "Jwt issuer is not configured"
	StatusAudience         = "Audiences in Jwt are not allowed"
	StatusVerificationFail = "Jwt verification fails"
	StatusNoKey            = "Jwks doesn't have key to match kid or alg from Jwt"
	StatusExpNotInteger    = "Jwt payload [exp] field is not an integer"
	StatusNbfNotInteger    = "Jwt payload [nbf] field is not an integer"
	StatusAudNotString     = "Jwt payload [aud] field is not a string or string list"
	StatusIssNotString     = "Jwt payload [iss] field is not a string"
	StatusSubNotString     = "Jwt payload [sub] field is not a string"
)

// ErrKeys: a key set could not be had (fetch, size, parse). A token that needs it fails, as
// under istiod, which inlines a key set that verifies nothing when it cannot fetch one
// (pilot/pkg/model/jwks_resolver.go).
var ErrKeys = errors.New("authn: no key set")

// Error is a request whose token failed: Envoy's jwt_authn answers Status with 401, or with
// 403 when the token's audiences are not allowed (filter.cc onComplete).
type Error struct {
	Status string // Envoy's status text: the local reply's body
	Issuer string // the issuer whose rule failed, when known
}

func (e *Error) Error() string {
	if e.Issuer != "" {
		return "authn: " + e.Issuer + ": " + e.Status
	}
	return "authn: " + e.Status
}

// Code is the HTTP status of the local reply.
func (e *Error) Code() int {
	if e.Status == StatusAudience {
		return http.StatusForbidden
	}
	return http.StatusUnauthorized
}
