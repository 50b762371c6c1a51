package testbed

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/miekg/dns"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// clusterDNS is the node's cluster DNS (the kubelet's clusterDNS, so every ClusterFirst pod's
// resolv.conf names it): A records for NAME.NS.svc.cluster.local, a Service's ClusterIP, read
// from the API server per query; every other name NXDOMAIN, AAAA empty. What CoreDNS's
// kubernetes plugin answers for ClusterIP Services (plugin/kubernetes/kubernetes.go, Records),
// nothing more: no pod records, no SRV, no headless Services, no forwarding (nothing here
// resolves outside the cluster). It listens on UDP on the node's IP only.
type clusterDNS struct {
	srv  *dns.Server
	done chan error
}

const clusterDomain = "svc.cluster.local."

func startClusterDNS(client kubernetes.Interface, ip string) (*clusterDNS, error) {
	pc, err := net.ListenPacket("udp", net.JoinHostPort(ip, "53"))
	if err != nil {
		return nil, fmt.Errorf("testbed: cluster DNS on %s:53: %w", ip, err)
	}
	d := &clusterDNS{done: make(chan error, 1)}
	d.srv = &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		w.WriteMsg(answer(client, q))
	})}
	go func() { d.done <- d.srv.ActivateAndServe() }()
	return d, nil
}

func answer(client kubernetes.Interface, q *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Authoritative = true
	if len(q.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		return m
	}
	question := q.Question[0]
	name := strings.ToLower(question.Name)
	rest, ok := strings.CutSuffix(name, "."+clusterDomain)
	svcName, ns, two := strings.Cut(rest, ".")
	if !ok || !two || strings.Contains(ns, ".") {
		m.Rcode = dns.RcodeNameError
		return m
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	svc, err := client.CoreV1().Services(ns).Get(ctx, svcName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		m.Rcode = dns.RcodeNameError
		return m
	case err != nil:
		m.Rcode = dns.RcodeServerFailure
		return m
	}
	ip := net.ParseIP(svc.Spec.ClusterIP).To4()
	if question.Qtype == dns.TypeA && ip != nil {
		m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: ip})
	}
	return m
}

// Close stops the server and waits for its goroutine.
func (d *clusterDNS) Close() error {
	if d == nil {
		return nil
	}
	err := d.srv.Shutdown()
	<-d.done
	return err
}
