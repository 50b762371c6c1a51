package gamma_test

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	echoproto "istio.io/istio/pkg/test/echo/proto"
	"sigs.k8s.io/gateway-api/conformance/utils/echo"
	"sigs.k8s.io/gateway-api/conformance/utils/weight"
)

// TestMeshGRPCRouteWeight replays MeshGRPCRouteWeight: a real gRPC client (Istio's echo
// service) over Istio's HBONE client to echo:7070, the suite's GRPCRoute splitting 70/30 over
// echo-v1 and echo-v2 (and weight 0 to the absent echo-v3), Istio's gRPC echo as the pods, and
// the suite's own distribution check.
func TestMeshGRPCRouteWeight(t *testing.T) {
	b := newBed(t)
	st, err := loadSuiteTest("grpcroute-weight.go")
	if err != nil {
		t.Fatal(err)
	}
	if st.name != "MeshGRPCRouteWeight" || len(st.cases) != 1 || st.cases[0].Request.Host != "echo:7070" || st.weights == nil {
		t.Fatalf("the suite's test changed: %+v", st)
	}
	_, dial := b.waypointDial(t, st.manifests)
	cc, err := grpc.NewClient("passthrough:///"+st.cases[0].Request.Host,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, addr) }))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := echoproto.NewEchoTestServiceClient(cc)
	sender := weight.NewBatchFunctionBasedSender(func(count int) ([]string, error) {
		out := make([]string, count)
		for i := range out {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			resp, err := client.Echo(ctx, &echoproto.EchoRequest{Message: "hello"})
			cancel()
			if err != nil {
				return nil, err
			}
			out[i] = "echo-" + echo.ParseResponse(resp.GetMessage()).Version
		}
		return out, nil
	})
	for range weight.MaxTestRetries {
		if err = weight.TestWeightedDistributionBatch(sender, st.weights); err == nil {
			return
		}
	}
	t.Errorf("weights %v: %v", st.weights, err)
}
