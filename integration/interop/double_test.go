package interop

import (
	istiohbone "istio.io/istio/pkg/hbone"

	it "github.com/detour-mesh/detour/integration"
)

func newIstioDoubleDialer(p *it.PKI, gateway string) istiohbone.Dialer {
	return istiohbone.NewDoubleDialer(
		istiohbone.Config{ProxyAddress: gateway, TLS: p.ClientTLS.Clone()},
		istiohbone.Config{ProxyAddress: gateway, TLS: p.ClientTLS.Clone()},
		p.ClientTLS.Clone())
}
