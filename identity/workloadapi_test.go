package identity_test

import (
	"context"
	"crypto/x509"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/detour-mesh/detour/identity"
	"github.com/detour-mesh/detour/identity/devca"
)

// workloadAPIServer is a real gRPC server of the SPIFFE Workload API on a unix socket: it checks
// the security header the API requires and streams whatever the test pushes.
type workloadAPIServer struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	ca      *devca.CA
	updates chan *x509svid.SVID
}

func (s *workloadAPIServer) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	for {
		select {
		case svid := <-s.updates:
			var chain []byte
			for _, c := range svid.Certificates {
				chain = append(chain, c.Raw...)
			}
			key, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
			if err != nil {
				return err
			}
			err = stream.Send(&workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
				SpiffeId: svid.ID.String(), X509Svid: chain, X509SvidKey: key, Bundle: s.ca.Root().Raw,
			}}})
			if err != nil {
				return err
			}
		case <-stream.Context().Done():
			return nil
		}
	}
}

func TestWorkloadAPI(t *testing.T) {
	ca := newCA(t)
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	api := &workloadAPIServer{ca: ca, updates: make(chan *x509svid.SVID, 2)}
	workload.RegisterSpiffeWorkloadAPIServer(srv, api)
	go srv.Serve(l)
	defer srv.Stop()

	w := &identity.WorkloadAPI{Addr: "unix://" + sock}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()

	first := issue(t, ca, serverID).SVID
	api.updates <- first
	got, err := identity.Wait(ctx, w)
	if err != nil {
		t.Fatal(err)
	}
	if got.SVID.ID.String() != serverID || !got.SVID.Certificates[0].Equal(first.Certificates[0]) || got.Bundle.TrustDomain().String() != "cluster.local" {
		t.Fatalf("got %s", got.SVID.ID)
	}
	// Rotation.
	_, changed := w.Identity()
	second := issue(t, ca, serverID).SVID
	api.updates <- second
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("rotation never arrived")
	}
	if cur, _ := w.Identity(); !cur.SVID.Certificates[0].Equal(second.Certificates[0]) {
		t.Fatal("not the rotated SVID")
	}
}
