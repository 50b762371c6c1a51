package mesh

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	secv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	istiosec "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/schema/gvk"
	"istio.io/istio/pkg/config/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/detour-mesh/detour/integration/testbed"
	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authn"
	"github.com/detour-mesh/detour/proxy/authz"
)

// A RequestAuthentication created, updated and deleted on the real API server changes what the
// waypoint's authenticator decides within 1 s, and istiod's own validation accepts the object.
func TestDiscoveryRequestAuthentication(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns = "jwt"
	if err := c.Namespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	d := &mesh.Discovery{Kube: c.Client, Istio: ic, Waypoint: authz.Waypoint{Namespace: ns, Gateway: "detour"}}
	runDiscovery(ctx, t, d)

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k", Algorithm: "ES256", Use: "sig"}}})
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k"))
	if err != nil {
		t.Fatal(err)
	}
	token, err := jwt.Signed(sig).Claims(map[string]any{"iss": "issuer", "sub": "alice", "exp": time.Now().Add(time.Hour).Unix()}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	web := authz.Service{Namespace: ns, Name: "web"}
	// outcome is what the current authenticator says of a request carrying tok.
	outcome := func(tok string) string {
		r := httptest.NewRequest("GET", "/", nil)
		r.Header.Set("Authorization", "Bearer "+tok)
		j, err := d.Authn().Authenticate(ctx, r, web)
		var ae *authn.Error
		switch {
		case errors.As(err, &ae):
			return ae.Status
		case err != nil:
			return err.Error()
		case j == nil:
			return "no principal"
		}
		return j.Principal
	}
	if got := outcome("deadbeef"); got != "no principal" {
		t.Fatalf("no RequestAuthentication yet: %q", got)
	}
	ra := &istiosec.RequestAuthentication{ObjectMeta: metav1.ObjectMeta{Name: "jwt", Namespace: ns},
		Spec: secv1beta1.RequestAuthentication{
			TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
			JwtRules:   []*secv1beta1.JWTRule{{Issuer: "issuer", Jwks: string(jwks)}},
		}}
	if _, err := validation.ValidateRequestAuthentication(config.Config{Meta: config.Meta{GroupVersionKind: gvk.RequestAuthentication,
		Namespace: ns, Name: "jwt"}, Spec: &ra.Spec}); err != nil {
		t.Fatalf("istiod refuses the RequestAuthentication: %v", err)
	}
	var took []string
	note := func(what string, d time.Duration) { took = append(took, what+" "+d.Round(time.Millisecond).String()) }
	if ra, err = ic.SecurityV1().RequestAuthentications(ns).Create(ctx, ra, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	note("created", within(t, "a new RequestAuthentication", func() bool { return outcome("deadbeef") == authn.StatusBadFormat }))
	if got := outcome(token); got != "issuer/alice" {
		t.Fatalf("a valid token: %q", got)
	}
	ra.Spec.JwtRules[0].Issuer = "other-issuer"
	if _, err := ic.SecurityV1().RequestAuthentications(ns).Update(ctx, ra, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	note("updated", within(t, "an updated issuer", func() bool { return outcome(token) == authn.StatusUnknownIssuer }))
	if err := ic.SecurityV1().RequestAuthentications(ns).Delete(ctx, "jwt", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	note("deleted", within(t, "a deleted RequestAuthentication", func() bool { return outcome("deadbeef") == "no principal" }))
	t.Logf("reflected after: %s", strings.Join(took, ", "))
}
