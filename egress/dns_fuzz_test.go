package egress

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The DNS server answers whatever a local process sends it without crashing: a raw packet is
// parsed by the server as it comes, and any message that parses gets an answer that carries only
// A records for the names it asked, from Resolve.
func FuzzDNS(f *testing.F) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	d := &DNS{Resolve: func(_ context.Context, host string) (net.IP, error) {
		if strings.HasSuffix(host, ".svc.cluster.local") {
			return net.IPv4(10, 96, 0, 10), nil
		}
		return nil, errors.New("not a cluster name")
	}}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { d.Serve(ctx, pc, l); close(served) }()
	f.Cleanup(func() { cancel(); <-served })
	raw, err := net.Dial("udp", pc.LocalAddr().String())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { raw.Close() })
	client := &dns.Client{Timeout: 2 * time.Second}

	for _, q := range []struct {
		name  string
		qtype uint16
	}{{"web.demo.svc.cluster.local.", dns.TypeA}, {"example.com.", dns.TypeA}, {"web.demo.svc.cluster.local.", dns.TypeAAAA}, {".", dns.TypeMX}} {
		m := new(dns.Msg)
		m.SetQuestion(q.name, q.qtype)
		b, _ := m.Pack()
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, packet []byte) {
		raw.Write(packet) // the server's own parser, on whatever bytes come
		var q dns.Msg
		if q.Unpack(packet) != nil {
			return
		}
		q.Response = false // a response would be ignored, as it should be
		resp, _, err := client.Exchange(&q, pc.LocalAddr().String())
		if err != nil {
			if errors.Is(err, dns.ErrBuf) || strings.Contains(err.Error(), "overflow") || strings.Contains(err.Error(), "pack") {
				return // the query itself cannot be sent as a datagram
			}
			t.Fatalf("no answer to %v: %v", &q, err)
		}
		asked := map[string]bool{}
		for _, qq := range q.Question {
			asked[qq.Name] = true
		}
		for _, rr := range resp.Answer {
			a, ok := rr.(*dns.A)
			if !ok || !asked[a.Hdr.Name] || !a.A.Equal(net.IPv4(10, 96, 0, 10)) {
				t.Fatalf("answer %v to %v", rr, &q)
			}
		}
	})
}
