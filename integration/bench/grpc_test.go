package bench

import (
	"bytes"
	"context"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
)

// grpcEcho answers UnaryCall with the request's payload.
type grpcEcho struct {
	testgrpc.UnimplementedTestServiceServer
}

func (grpcEcho) UnaryCall(_ context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return &testgrpc.SimpleResponse{Payload: in.GetPayload()}, nil
}

// backendGRPC runs a gRPC (HTTP/2 cleartext) echo app on 127.0.0.2 and returns its port.
func backendGRPC(b *testing.B) int {
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, grpcEcho{})
	go gs.Serve(l)
	b.Cleanup(gs.Stop)
	return l.Addr().(*net.TCPAddr).Port
}

// BenchmarkPinnedGRPC: unary gRPC calls (1 KiB echoed) from 8 client connections (one HBONE
// stream each, HTTP/2 prior knowledge) through the waypoint process with HTTP parsed by default
// (an undeclared port, sniffed), every call carrying a bearer token: "grpc" with no policy,
// "grpc-jwt-100routes" with a RequestAuthentication and an ALLOW on its request principal
// (jwtStatic) and an HTTPRoute of 100 rules (hundredRules) on the port, the call matched
// against all of them. Reports the waypoint's vCPU per 1000 calls/s, as BenchmarkPinnedHTTPJWT
// does for HTTP/1.1 ("jwt-100routes" there is the same destination).
func BenchmarkPinnedGRPC(b *testing.B) {
	static, token := jwtStatic(b)
	const conns = 8
	for _, name := range []string{"grpc", "grpc-jwt-100routes"} {
		b.Run(name, func(b *testing.B) {
			app := backendGRPC(b)
			doc := ""
			if strings.HasSuffix(name, "jwt-100routes") {
				doc = static + hundredRulesStatic()
			}
			w := newPinnedBedWith(b, app, "auto", "echo", doc)
			d := dialer(b)
			var clients []testgrpc.TestServiceClient
			for range conns {
				cc, err := grpc.NewClient("passthrough:///10.96.0.10:80", grpc.WithTransportCredentials(insecure.NewCredentials()),
					grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return w.dial(b, d, "waypoint", app) }))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { cc.Close() })
				clients = append(clients, testgrpc.NewTestServiceClient(cc))
			}
			ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
			msg := bytes.Repeat([]byte("x"), 1024)
			do := func(c testgrpc.TestServiceClient) {
				resp, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: msg}})
				if err != nil {
					b.Fatal(err)
				}
				if len(resp.GetPayload().GetBody()) != len(msg) {
					b.Fatalf("%d bytes echoed", len(resp.GetPayload().GetBody()))
				}
			}
			runParallel(b, len(clients), func(i int) { do(clients[i]) }, w.cpu)
		})
	}
}
