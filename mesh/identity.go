package mesh

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/istioca"
)

// AccountIdentity is a mesh identity for a service account, from istiod's CA, with a token the
// user's kubeconfig may request (TokenRequest, audience istio-ca): what `--service-account` gives
// the developer's CLI.
type AccountIdentity struct {
	Kube            kubernetes.Interface
	Namespace, Name string // the service account
	Istiod          string // the CA's address, host:15012
	// MeshRoot is the mesh's root certificate (PEM); nil reads the istio-ca-root-cert ConfigMap of
	// Namespace.
	MeshRoot []byte
	Logger   *slog.Logger // nil means slog.Default()

	wg sync.WaitGroup
}

// Start gets the first certificate (waiting at most 30 s) and keeps it renewed until ctx ends;
// Wait joins the renewal.
func (a *AccountIdentity) Start(ctx context.Context) (identity.Source, error) {
	root := a.MeshRoot
	if root == nil {
		cm, err := a.Kube.CoreV1().ConfigMaps(a.Namespace).Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("mesh: reading the mesh root (ConfigMap %s/istio-ca-root-cert; or pass --mesh-root): %w", a.Namespace, err)
		}
		root = []byte(cm.Data["root-cert.pem"])
	}
	exp := int64(3600)
	src := &identity.IstioCA{
		Client: &istioca.Client{Addr: a.Istiod, Token: func(ctx context.Context) (string, error) {
			tr, err := a.Kube.CoreV1().ServiceAccounts(a.Namespace).CreateToken(ctx, a.Name, &authv1.TokenRequest{
				Spec: authv1.TokenRequestSpec{Audiences: []string{"istio-ca"}, ExpirationSeconds: &exp}}, metav1.CreateOptions{})
			if err != nil {
				return "", fmt.Errorf("mesh: TokenRequest for %s/%s (does your kubeconfig allow create serviceaccounts/token?): %w", a.Namespace, a.Name, err)
			}
			return tr.Status.Token, nil
		}},
		RootCert: root,
		Logger:   a.Logger,
	}
	rctx, stop := context.WithCancel(ctx)
	a.wg.Go(func() { src.Run(rctx) })
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := identity.Wait(wctx, src); err != nil {
		stop()
		a.wg.Wait()
		return nil, fmt.Errorf("mesh: no certificate from istiod's CA at %s for %s/%s: %w", a.Istiod, a.Namespace, a.Name, err)
	}
	context.AfterFunc(ctx, stop)
	return src, nil
}

// Wait blocks until the renewal started by Start has ended (after its context did).
func (a *AccountIdentity) Wait() { a.wg.Wait() }
