package testbed_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/detour-mesh/detour/integration/testbed"
)

// Two network-namespace pods: a ztunnel stand-in in one sends HBONE, with a certificate from
// istiod's CA, to Istio's own Go HBONE server in the other, which forwards to an echo server there.
func TestHBONEBetweenPods(t *testing.T) {
	c := testbed.Start(t, testbed.Options{Istiod: true})
	network := testbed.NewNetwork(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.Namespace(ctx, "demo", nil); err != nil {
		t.Fatal(err)
	}
	client := network.Pod(t, c, "demo", "sleep", "sleep")
	server := network.Pod(t, c, "demo", "echo", "echo")

	serverID, err := c.Workload(ctx, "demo", "echo")
	if err != nil {
		t.Fatal(err)
	}
	server.RunIstioHBONE(t, serverID)
	server.Run(t, server.IP+":8080", "echo", server.IP+":8080")

	clientID, err := c.Workload(ctx, "demo", "sleep")
	if err != nil {
		t.Fatal(err)
	}
	z := testbed.NewZtunnel(clientID, client.DialContext)
	defer z.Close()
	s, err := z.Dial(ctx, server.IP+":15008", serverID.SVID.ID.String(), server.IP+":8080", netip.MustParseAddrPort(client.IP+":41234"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	msg := []byte("hello across network namespaces")
	if _, err := s.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("got %q, %v", got, err)
	}
}

// A Network's Node lets the root namespace reach a pod's HTTP server (podproc http), and its
// cleanup puts the blackhole route back.
func TestNodeReachesPod(t *testing.T) {
	network := testbed.NewNetwork(t)
	network.Node(t)
	pod := network.Pod(t, nil, "demo", "web", "web")
	pod.Run(t, pod.IP+":8080", "http", pod.IP+":8080", "real")
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + pod.IP + ":8080/x")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if body, err := io.ReadAll(resp.Body); err != nil || string(body) != "real GET /x" {
		t.Fatalf("from the root namespace: %q %v", body, err)
	}
}
