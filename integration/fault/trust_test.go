package fault

import (
	"net"
	"strconv"
	"testing"
)

// A forwarding loop: a CONNECT to the waypoint's own Service (whose pod is the waypoint) or to
// its pod address is refused at once with 400 or 503, and nothing piles up.
func TestForwardingLoop(t *testing.T) {
	b := newBed(t, bedOptions{})
	w := b.startWaypoint(selfIP)
	bg := b.startLoad(w, loadOptions{})
	r := b.dialRaw(t, w.hbone, attackerID, true)
	for _, target := range []string{selfVIP + ":82", net.JoinHostPort(selfIP, strconv.Itoa(b.tcpPort))} {
		if _, err := r.connect(target); err != nil {
			t.Fatal(err)
		}
	}
	got := r.answered(2)
	checkLoad(t, bg.wait())
	w.checkMemory(t, loopCeiling, healthyRSS)
	if got["400"]+got["503"] != 2 {
		t.Errorf("CONNECTs to the waypoint's own VIP and pod address: statuses %v within 5 s, want two 400 or 503", got)
	}
}

// A forged Forwarded header never passes for a source address: with a policy allowing only
// ipBlocks 10.244.0.0/16, a client on loopback is refused with and without
// Forwarded: for="10.244.1.1:1234" (Istio's Go dialer sends no extra headers: a raw CONNECT).
func TestForgedForwarded(t *testing.T) {
	b := newBed(t, bedOptions{})
	w := b.startWaypoint(selfIP)
	bg := b.startLoad(w, loadOptions{})
	r := b.dialRaw(t, w.hbone, attackerID, true)
	plain, err := r.connect(ipbVIP + ":82")
	if err != nil {
		t.Fatal(err)
	}
	forged, err := r.connect(ipbVIP+":82", "forwarded", `for="10.244.1.1:1234"`)
	if err != nil {
		t.Fatal(err)
	}
	r.answered(2)
	checkLoad(t, bg.wait())
	if p, f := r.statusOf(plain), r.statusOf(forged); p != "403" || f != "403" {
		t.Errorf("a client on 127.0.0.1 to a service allowing only 10.244.0.0/16: %q without Forwarded, %q with Forwarded: for=\"10.244.1.1:1234\"; want 403 both", p, f)
	}
}
