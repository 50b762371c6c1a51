package egress

import (
	"context"
	"net"
	"testing"
	"time"
)

// A resolver stopped right after it was started (detour run whose CMD dies at once) still stops:
// miekg/dns ignores a Shutdown before its server started, which then served forever and kept
// detour run from exiting.
func TestDNSStopsRightAfterStart(t *testing.T) {
	for i := range 200 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- (&DNS{}).Serve(ctx, pc, l) }()
		if i%2 == 0 {
			cancel() // before it could start
		} else {
			time.AfterFunc(time.Duration(i)*time.Microsecond, cancel)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("run %d: %v", i, err)
			}
		case <-time.After(10 * time.Second): // a hang guard
			t.Fatalf("run %d: Serve did not return after its context ended", i)
		}
		cancel()
	}
}
