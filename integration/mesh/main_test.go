package mesh

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health/grpc_health_v1"
)

// TestMain lets this test binary stand in for the developer's process under `detour run`:
// DETOUR_TEST_ROLE picks what it does.
func TestMain(m *testing.M) {
	switch os.Getenv("DETOUR_TEST_ROLE") {
	case "grpc-client":
		os.Exit(grpcClient(os.Args[len(os.Args)-1]))
	case "header-app":
		os.Exit(headerApp(os.Args[len(os.Args)-2], os.Args[len(os.Args)-1]))
	}
	os.Exit(m.Run())
}

// grpcClient calls the gRPC health service at target through the SOCKS5 proxy of ALL_PROXY.
func grpcClient(target string) int {
	d, err := proxy.FromURL(mustURL(os.Getenv("ALL_PROXY")), proxy.Direct)
	if err != nil {
		fmt.Println("grpc-client:", err)
		return 2
	}
	cc, err := grpc.NewClient("passthrough:///"+target, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return d.(proxy.ContextDialer).DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		fmt.Println("grpc-client:", err)
		return 2
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := grpc_health_v1.NewHealthClient(cc).Check(ctx, &grpc_health_v1.HealthCheckRequest{})
	if err != nil {
		fmt.Println("grpc-client:", err)
		return 3
	}
	fmt.Println("grpc health:", resp.GetStatus())
	return 0
}

// headerApp serves HTTP on addr and appends the tracing headers of each request to file.
func headerApp(addr, file string) int {
	err := http.ListenAndServe(addr, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, _ := os.OpenFile(file, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		fmt.Fprintf(f, "forwarded=%s baggage=%s traceparent=%s\n", r.Header.Get("Forwarded"), r.Header.Get("Baggage"), r.Header.Get("Traceparent"))
		f.Close()
		io.WriteString(w, "local app")
	}))
	fmt.Println("header-app:", err)
	return 1
}

func mustURL(s string) *url.URL {
	u, err := url.Parse(strings.TrimSpace(s))
	if err != nil {
		panic(err)
	}
	return u
}
