package fault

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/detour-mesh/detour/proxy/tunnel"
)

// bigRegex is an 18 KiB header regex that RE2 accepts and whose compilation costs about 250 MB in
// Go (1,675 repetitions of [a-z]{1000}).
var bigRegex = strings.Repeat("[a-z]{1000}", 1675)

// Cost before authorization: tunnel Hellos from a developer no policy grants anything, each with
// an 18 KiB header regex, are refused before anything proportional to their size is done.
func TestHelloCostBeforeAuthorization(t *testing.T) {
	b := newBed(t, bedOptions{})
	w := b.startWaypoint(selfIP)
	bg := b.startLoad(w, loadOptions{})
	const intruder = "spiffe://cluster.local/ns/intruder/sa/eve"
	var wg sync.WaitGroup
	replies := make(chan string, 4)
	for i := range 4 {
		transport := []string{"quic", "h2"}[i%2]
		wg.Go(func() { replies <- b.hello(w, transport, intruder, bigRegex) })
	}
	wg.Wait()
	close(replies)
	refused := 0
	for r := range replies {
		if strings.HasPrefix(r, "refused: ") {
			refused++
		} else {
			t.Errorf("an unauthorized Hello: %s", r)
		}
	}
	checkLoad(t, bg.wait())
	w.checkMemory(t, helloCeiling, healthyRSS)
	t.Logf("%d of 4 Hellos refused", refused)
}

// hello registers a steal on web:80 filtered by header x-dev matching regex, as id, and says what
// the waypoint answered.
func (b *bed) hello(w *waypoint, transport, id, regex string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tn, err := tunnel.Dial(ctx, transport, w.tunnel, b.source(id), nil, slog.New(slog.DiscardHandler))
	if err != nil {
		return fmt.Sprintf("%s tunnel: %v", transport, err)
	}
	defer tn.Close()
	ctl := tn.Control()
	ctl.SetDeadline(time.Now().Add(10 * time.Second))
	hello := tunnel.Hello{Register: &tunnel.Spec{Namespace: "demo", Service: "web", Port: 80, Mode: "steal",
		Filter: tunnel.Filter{Header: "x-dev", HeaderRegex: regex}}}
	if err := tunnel.WriteMsg(ctl, hello); err != nil {
		return fmt.Sprintf("%s: writing the Hello: %v", transport, err)
	}
	var reply tunnel.Reply
	if err := tunnel.ReadMsg(ctl, &reply); err != nil {
		return fmt.Sprintf("%s: no reply: %v", transport, err)
	}
	if reply.OK {
		return transport + ": registered"
	}
	return "refused: " + reply.Error
}
