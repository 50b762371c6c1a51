package waypoint

import (
	"net"
	"net/netip"
	"testing"
)

// addrPort gives what parsing the address's text gave: IPv4 unmapped, zones kept.
func TestAddrPort(t *testing.T) {
	for _, a := range []net.Addr{
		&net.TCPAddr{IP: net.ParseIP("10.0.0.7"), Port: 80}, // 16-byte form
		&net.TCPAddr{IP: net.IPv4(10, 0, 0, 7).To4(), Port: 80},
		&net.TCPAddr{IP: net.ParseIP("fe80::1"), Port: 443, Zone: "eth0"},
		&net.UDPAddr{IP: net.ParseIP("2001:db8::1"), Port: 53},
	} {
		want, err := netip.ParseAddrPort(a.String())
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := addrPort(a); !ok || got != want {
			t.Errorf("addrPort(%v) = %v, %v; want %v", a, got, ok, want)
		}
	}
	if _, ok := addrPort(nil); ok {
		t.Error("addrPort(nil) is ok")
	}
}
