package waypoint

import (
	"errors"
	"net/http"

	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
	"github.com/detour-mesh/detour/proxy/route"
)

// authenticate validates r's tokens against the RequestAuthentications that apply to dest and
// puts the request's JWT (nil: it carried none) in hr. A token that fails is answered here, as
// Envoy's jwt_authn answers it after the CUSTOM check and before RBAC (see authorizeHTTP): 401 (403 for audiences not allowed) with its status
// as the body and a WWW-Authenticate challenge; gRPC: UNAUTHENTICATED (16) or
// PERMISSION_DENIED (7). It reports whether the request goes on.
func (hs *httpStream) authenticate(w http.ResponseWriter, r *http.Request, grpc bool, dest *route.Destination, hr *authz.HTTPRequest) bool {
	if hs.h.Authn == nil {
		return true
	}
	jwt, err := hs.h.Authn().Authenticate(r.Context(), r, authzService(dest))
	if err == nil {
		hr.JWT = jwt
		return true
	}
	ae := &authn.Error{Status: authn.StatusVerificationFail}
	errors.As(err, &ae)
	hs.h.log().Debug("authn: token refused", "target", hs.req.Target.String(), "path", r.URL.Path, "err", err)
	// Envoy's realm is the request's URI without its query (which may hold the token).
	w.Header().Set("Www-Authenticate", `Bearer realm="http://`+r.Host+r.URL.EscapedPath()+`", error="invalid_token"`)
	code, grpcCode := ae.Code(), 16
	if code == http.StatusForbidden {
		grpcCode = 7
	}
	localReply(w, grpc, code, grpcCode, ae.Status)
	return false
}
