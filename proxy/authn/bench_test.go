package authn

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	secv1beta1 "istio.io/api/security/v1beta1"
)

// BenchmarkAuthenticate: one RS256 bearer token (Istio's sample algorithm) validated per request.
func BenchmarkAuthenticate(b *testing.B) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k", Algorithm: "RS256", Use: "sig"}}})
	sig, _ := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k"))
	tok, _ := jwt.Signed(sig).Claims(map[string]any{"iss": "iss", "sub": "sub", "exp": time.Now().Add(time.Hour).Unix(), "groups": []string{"a"}}).Serialize()
	a := New(wp, []*Policy{ra("a", &secv1beta1.JWTRule{Issuer: "iss", Jwks: string(jwks)})}, nil, nil)
	b.ReportAllocs()
	for b.Loop() {
		r := httptest.NewRequest("GET", "/", nil)
		r.Header.Set("Authorization", "Bearer "+tok)
		if j, err := a.Authenticate(context.Background(), r, web); err != nil || j == nil {
			b.Fatal(err)
		}
	}
}
