package fault

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"math/big"
	"testing"
	"time"
)

// held are TCP streams opened before a fault and kept open through it.
type held []*tcpStream

// hold opens n streams to web's TCP port through w, each past the pod's greeting.
func (b *bed) hold(w *waypoint, n int) held {
	c := &loadClient{id: "spiffe://cluster.local/ns/load/sa/held", b: b}
	c.d = istioDialer(w, b.clientTLS(c.id))
	var out held
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := c.dial(ctx, webVIP+":82")
		cancel()
		if err != nil {
			b.t.Fatal(err)
		}
		b.t.Cleanup(func() { conn.Close() })
		s := &tcpStream{Conn: conn, br: bufio.NewReader(conn)}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := s.greeting(); err != nil {
			b.t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

// broken round-trips 16 bytes on every stream and returns how many failed, by pod.
func (h held) broken() map[string]int {
	out := map[string]int{}
	for _, s := range h {
		s.SetDeadline(time.Now().Add(3 * time.Second))
		if err := s.echo([]byte("still there? ...")); err != nil {
			out[s.pod]++
		}
	}
	return out
}

func (h held) byPod() map[string]int {
	out := map[string]int{}
	for _, s := range h {
		out[s.pod]++
	}
	return out
}

// kill -9 of a waypoint replica: clients of the other replica see no failure, the streams held
// through the killed one all break (exactly those), and once restarted on the same ports it
// serves again.
func TestKillWaypoint(t *testing.T) {
	b := newBed(t, bedOptions{})
	a, other := b.startWaypoint(selfIP), b.startWaypoint("127.0.0.4")
	streams := b.hold(a, 8)
	bg := b.startLoad(other, loadOptions{})
	bg.waitEnded(50)
	a.kill()
	broken := streams.broken()
	checkLoad(t, bg.wait())
	if n := broken["pod2"] + broken["pod3"]; n != len(streams) {
		t.Errorf("%d of the %d streams held through the killed replica broke, want all %d", n, len(streams), len(streams))
	}
	a.start()
	after := b.startLoad(a, loadOptions{n: 50})
	if r := after.wait(); len(r.failed(nil)) > 0 {
		t.Errorf("after the restart: %s", r)
	}
}

// kill -9 of an endpoint's HBONE terminator: the streams held through it break, exactly those;
// no background request fails but those in flight during the kill.
func TestKillEndpoint(t *testing.T) {
	b := newBed(t, bedOptions{})
	w := b.startWaypoint(selfIP)
	streams := b.hold(w, 8)
	bg := b.startLoad(w, loadOptions{})
	bg.waitEnded(50)
	victim := b.pods[1]
	sent := time.Now()
	victim.term.Process.Kill()
	<-victim.term.Done
	gone := time.Now()
	broken := streams.broken()
	res := bg.wait()
	inFlight := func(r result) bool { return r.start.Before(gone) && r.end.After(sent) }
	others := res.failed(func(r result) bool { return !inFlight(r) })
	t.Logf("in flight during the kill: %s", res.describe(inFlight))
	if len(others) > 0 {
		t.Errorf("not in flight during the kill of %s: %s", victim.name, res.describe(func(r result) bool { return !inFlight(r) }))
	}
	want := streams.byPod()[victim.name]
	if broken[victim.name] != want || broken[b.pods[0].name] != 0 || want == 0 {
		t.Errorf("held streams broken: %v of %v; want exactly the %d through %s", broken, streams.byPod(), want, victim.name)
	}
}

// Certificate rotation of the waypoint (a new key in the files it polls) under the background
// load: no request fails, streams opened before keep flowing, new handshakes see the new
// certificate.
func TestCertificateRotation(t *testing.T) {
	b := newBed(t, bedOptions{filesIdentity: true})
	w := b.startWaypoint(selfIP)
	streams := b.hold(w, 4)
	bg := b.startLoad(w, loadOptions{n: 250})
	bg.waitEnded(30)
	old := b.servedSerial(w)
	b.rotate()
	rotated := false
	for range 100 {
		if s := b.servedSerial(w); s.Cmp(old) != 0 {
			rotated = true
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	checkLoad(t, bg.wait())
	if !rotated {
		t.Errorf("the waypoint still serves certificate %s 10 s after the rotation", old)
	}
	if broken := streams.broken(); len(broken) > 0 {
		t.Errorf("streams opened before the rotation broke: %v of %v", broken, streams.byPod())
	}
}

// servedSerial is the serial number of the certificate the waypoint presents now.
func (b *bed) servedSerial(w *waypoint) *big.Int {
	cfg := b.clientTLS("spiffe://cluster.local/ns/load/sa/a").Clone()
	cfg.NextProtos = []string{"h2"}
	c, err := tls.Dial("tcp", w.hbone, cfg)
	if err != nil {
		b.t.Fatal(fmt.Errorf("handshake with the waypoint: %w", err))
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber
}
