package egress

import (
	"context"
	"errors"
	"net"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// DNS answers A queries for cluster service names (NAME, NAME.NS, NAME.NS.svc,
// NAME.NS.svc.cluster.local) with their VIPs, from Resolve; anything else is refused, so a
// process that asks it only for cluster names falls back to its usual resolver for the rest.
type DNS struct {
	Resolve func(ctx context.Context, host string) (net.IP, error)
}

// Serve answers on pc (UDP) and l (TCP) until ctx ends.
func (d *DNS) Serve(ctx context.Context, pc net.PacketConn, l net.Listener) error {
	h := dns.HandlerFunc(d.answer)
	// miekg/dns ignores a Shutdown that comes before its server started, which then serves
	// forever: each server is shut down only once it said it started (or failed to).
	udpUp, tcpUp := make(chan struct{}), make(chan struct{})
	udp := &dns.Server{PacketConn: pc, Handler: h, NotifyStartedFunc: func() { close(udpUp) }}
	tcp := &dns.Server{Listener: l, Handler: h, NotifyStartedFunc: func() { close(tcpUp) }}
	udpErr, tcpErr := make(chan error, 1), make(chan error, 1)
	go func() { udpErr <- udp.ActivateAndServe() }()
	go func() { tcpErr <- tcp.ActivateAndServe() }()
	wait := func(s *dns.Server, up chan struct{}, errc chan error) error {
		select {
		case <-up:
		case err := <-errc:
			return err // never started
		}
		select {
		case err := <-errc:
			return err
		case <-ctx.Done():
			s.Shutdown()
			return <-errc
		}
	}
	uerr := wait(udp, udpUp, udpErr)
	terr := wait(tcp, tcpUp, tcpErr)
	if ctx.Err() != nil {
		return nil
	}
	return errors.Join(uerr, terr)
}

func (d *DNS) answer(w dns.ResponseWriter, q *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Authoritative = true
	for _, question := range q.Question {
		name := strings.TrimSuffix(question.Name, ".")
		if question.Qtype != dns.TypeA && question.Qtype != dns.TypeAAAA {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		ip, err := d.Resolve(ctx, name)
		cancel()
		if err != nil {
			m.Rcode = dns.RcodeNameError
			continue
		}
		if question.Qtype == dns.TypeA && ip.To4() != nil {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: ip.To4()})
		}
	}
	w.WriteMsg(m)
}
