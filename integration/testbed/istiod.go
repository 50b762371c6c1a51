package testbed

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// Istiod is a running istiod. Fields are immutable after Start.
type Istiod struct {
	HTTPAddr string // debug and readiness (/debug/ambientz, /ready); loopback callers need no auth
	XDSAddr  string // plaintext xDS
	CAAddr   string // secure gRPC: the CA (IstioCertificateService) and xDS over TLS
	// ServerName is a name in istiod's serving certificate on CAAddr.
	ServerName string
	// Root is the mesh root certificate (Secret istio-ca-secret, ca-cert.pem): it verifies
	// istiod's serving certificate and every workload certificate istiod issues.
	Root  *x509.Certificate
	Roots *x509.CertPool
}

// meshConfig is the smallest mesh config for a local istiod; see istio pkg/config/mesh.
const meshConfig = `trustDomain: cluster.local
rootNamespace: istio-system
ingressControllerMode: "OFF"
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
`

// startIstiod runs pilot-discovery against the cluster with ambient mode on, from an empty
// working directory (istiod probes relative paths such as ./etc/cacerts), every listener on a
// free loopback port, and no webhook patching, injection or deployment controller (there are no
// kubelets to run waypoints; tests run their own).
func (c *Cluster) startIstiod(ctx context.Context, bins Binaries) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("testbed: creating istio-system: %w", err)
	}
	dir := filepath.Join(c.Dir, "istiod")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	mesh := filepath.Join(dir, "mesh.yaml")
	if err := os.WriteFile(mesh, []byte(meshConfig), 0o644); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	ports, err := freePorts(5)
	if err != nil {
		return err
	}
	addr := func(i int) string { return "127.0.0.1:" + strconv.Itoa(ports[i]) }
	c.Istiod = &Istiod{HTTPAddr: addr(0), XDSAddr: addr(1), CAAddr: addr(2), ServerName: "istiod.istio-system.svc"}
	if c.Node != nil {
		// The node's pods reach the CA as a mesh's do: istiod.istio-system.svc:15012 (the
		// node's cluster DNS, the Service below, kube-proxy) to istiod on the node's IP.
		c.Istiod.CAAddr = net.JoinHostPort(c.Node.IP, strconv.Itoa(ports[2]))
	}
	env := []string{
		"POD_NAMESPACE=istio-system", "POD_NAME=istiod-testbed", "CLUSTER_ID=Kubernetes",
		"PILOT_ENABLE_AMBIENT=true", "ISTIOD_CUSTOM_HOST=localhost,127.0.0.1",
		"INJECT_ENABLED=false", "INJECTION_WEBHOOK_CONFIG_NAME=", "VALIDATION_WEBHOOK_CONFIG_NAME=",
		"PILOT_ENABLE_GATEWAY_API_DEPLOYMENT_CONTROLLER=false", "ENABLE_LEADER_ELECTION=false",
		"KUBERNETES_SERVICE_HOST=", "KUBERNETES_SERVICE_PORT=",
	}
	p, err := startProcIn(dir, c.Dir, "istiod", env, bins.Istiod, "discovery",
		"--kubeconfig", c.Kubeconfig,
		"--meshConfig", mesh,
		"--domain", "cluster.local",
		"--httpAddr", addr(0),
		"--grpcAddr", addr(1),
		"--secureGRPCAddr", c.Istiod.CAAddr,
		"--monitoringAddr", addr(3),
		"--httpsAddr", addr(4),
		"--ctrlz_address", "127.0.0.1", "--ctrlz_port", "0",
		"--log_output_level", "default:info")
	if err != nil {
		return err
	}
	c.procs = append(c.procs, p)
	if err := c.waitHTTP(ctx, "http://"+c.Istiod.HTTPAddr+"/ready", "", p); err != nil {
		return err
	}
	if c.Node != nil {
		if err := c.Namespace(ctx, "istio-system", nil); err != nil {
			return err
		}
		if _, err := c.Service(ctx, "istio-system", "istiod", nil, []ServicePort{{Name: "https-dns", Port: 15012, TargetPort: int32(ports[2])}}, c.Node.IP); err != nil {
			return err
		}
	}
	return c.readMeshRoot(ctx)
}

// readMeshRoot loads the root istiod's CA generated into Secret istio-system/istio-ca-secret.
func (c *Cluster) readMeshRoot(ctx context.Context) error {
	var pemBytes []byte
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		s, err := c.Client.CoreV1().Secrets("istio-system").Get(ctx, "istio-ca-secret", metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pemBytes = s.Data["ca-cert.pem"]
		return len(pemBytes) > 0, nil
	})
	if err != nil {
		return fmt.Errorf("testbed: istiod's CA root (Secret istio-system/istio-ca-secret): %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return fmt.Errorf("testbed: istio-ca-secret ca-cert.pem holds no certificate")
	}
	certs, err := parsePEMCerts(pemBytes)
	if err != nil {
		return err
	}
	c.Istiod.Root, c.Istiod.Roots = certs[0], pool
	return nil
}
