package waypoint_test

import (
	"bytes"
	"crypto/tls"
	"io"
	"maps"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
	"github.com/detour-mesh/detour/proxy/waypoint"
)

// l4Sessions is the L4 bed with debug sessions (developers).
type l4Sessions struct {
	*l4Bed
	*developers
	reg *session.Registry
}

func newL4Sessions(t *testing.T, routes ...string) *l4Sessions {
	ls := &l4Sessions{reg: &session.Registry{}}
	ls.l4Bed = newL4Bed(t, func(h *waypoint.Handler) { h.Sessions = ls.reg }, routes...)
	ls.developers = serveDevelopers(t, ls.handler, ls.reg, nil, ls.id("spiffe://cluster.local/ns/dev/sa/alice"))
	return ls
}

// steal registers alice's whole-stream steal of service's port; her app answers as the pods do,
// as pod "developer" (inside TLS on port 443).
func (ls *l4Sessions) steal(t *testing.T, service string, port uint16) {
	t.Helper()
	cert := selfSigned(t)
	ls.developer(t, ls.tunnel, tunnel.Spec{Namespace: "demo", Service: service, Port: port, Mode: session.Steal}, ls.app(t, func(c net.Conn, _ <-chan struct{}) {
		if port == 443 {
			c = tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		}
		bannerEcho(c, "developer")
	}))
}

// mirror registers alice's whole-stream mirror of service's port: each copy's bytes arrive on
// the channel once the copy ended.
func (ls *l4Sessions) mirror(t *testing.T, service string, port uint16) <-chan []byte {
	t.Helper()
	copies := make(chan []byte, 64)
	ls.developer(t, ls.tunnel, tunnel.Spec{Namespace: "demo", Service: service, Port: port, Mode: session.Mirror}, ls.app(t, func(c net.Conn, _ <-chan struct{}) {
		got, _ := io.ReadAll(c)
		copies <- got
	}))
	return copies
}

const tcpToEmpty = `
kind: TCPRoute
metadata: {name: to-empty, namespace: demo}
spec:
  parentRefs: [{name: echo-v1, port: 5432}]
  rules: [{backendRefs: [{name: empty, port: 5432}]}]
`

// A whole-stream steal on a service reached as a TCPRoute's or TLSRoute's backend takes the
// streams the route draws for it, and only those: the others go where the route says (the
// weights drawn as without the session), on a port decided at CONNECT (5432), one decided once
// sniffed (9000) and by the SNI (443). A backend without endpoints of its own is stolen too (the
// developer is its endpoint). A steal on the addressed service takes its streams before its
// routes (proxy/README.md, "Routes (TCPRoute and TLSRoute)").
func TestStealOnL4Route(t *testing.T) {
	t.Run("backend", func(t *testing.T) {
		ls := newL4Sessions(t, append(strings.Split(tlsRoutes, "---"), tcpSplit, tcpToEmpty)...)
		ls.steal(t, "echo-v2", 5432)
		ls.steal(t, "echo-v2", 443)
		ls.steal(t, "empty", 5432)
		for _, target := range []string{"10.96.0.30:5432", "10.96.0.30:9000"} {
			if counts := ls.spread(t, target, "", 20, 1000); !maps.Equal(counts, map[string]int{"echo-v1": 15, "developer": 5}) {
				t.Errorf("%s: 20 connections over weights 3:1 went %v, want echo-v1 15, the developer (stealing echo-v2) 5", target, counts)
			}
		}
		if counts := ls.spread(t, "10.96.0.30:443", "web.example.com", 10, 1000); !maps.Equal(counts, map[string]int{"echo-v1": 5, "developer": 5}) {
			t.Errorf("TLS: 10 connections over weights 1:1 went %v, want echo-v1 5, the developer (stealing echo-v2:443) 5", counts)
		}
		if pod, err := ls.exchange(t, "10.96.0.30:443", "api.example.com", []byte("x")); err != nil || pod != "echo-v1" {
			t.Errorf("api.example.com, routed to echo-v1 only: %s, %v", pod, err)
		}
		if pod, err := ls.exchange(t, "10.96.0.31:5432", "", []byte("x")); err != nil || pod != "developer" {
			t.Errorf("echo-v1, routed to empty (stolen): %s, %v; want the developer", pod, err)
		}
	})
	t.Run("parent", func(t *testing.T) {
		ls := newL4Sessions(t, tcpSplit)
		ls.steal(t, "echo", 5432)
		for _, target := range []string{"10.96.0.30:5432", "10.96.0.30:9000"} {
			counts := ls.spread(t, target, "", 8, 1000)
			want := map[string]int{"developer": 8} // the steal takes echo:5432 whole
			if target == "10.96.0.30:9000" {
				want = map[string]int{"echo-v1": 6, "echo-v2": 2} // another port: routed
			}
			if !maps.Equal(counts, want) {
				t.Errorf("%s: %v, want %v", target, counts, want)
			}
		}
	})
}

// Whole-stream mirrors: one on the addressed service gets a copy of every stream, as the client
// sent it; one on a route's backend a copy of each stream the route draws for that backend, and
// of no other; the streams themselves go where the route says.
func TestMirrorOnL4Route(t *testing.T) {
	ls := newL4Sessions(t, tcpSplit)
	parent, backend := ls.mirror(t, "echo", 5432), ls.mirror(t, "echo-v2", 5432)
	next := func(copies <-chan []byte, what string) []byte {
		t.Helper()
		select {
		case c := <-copies:
			return c
		case <-time.After(10 * time.Second): // a hang guard: the copy never came
			t.Fatalf("no copy for the mirror on %s", what)
			return nil
		}
	}
	counts := map[string]int{}
	for i := range 20 {
		sent := payload(t, 1000+i)
		pod, err := ls.exchange(t, "10.96.0.30:5432", "", sent)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		counts[pod]++
		if got := next(parent, "echo"); !bytes.Equal(got, sent) {
			t.Errorf("connection %d: echo's mirror got %d bytes, not the %d sent", i, len(got), len(sent))
		}
		if pod != "echo-v2" {
			continue
		}
		if got := next(backend, "echo-v2"); !bytes.Equal(got, sent) {
			t.Errorf("connection %d, routed to echo-v2: echo-v2's mirror got %d bytes, not the %d sent (a copy of another stream?)", i, len(got), len(sent))
		}
	}
	if counts["echo-v1"] != 15 || counts["echo-v2"] != 5 {
		t.Errorf("20 mirrored connections over weights 3:1 went %v, want echo-v1 15, echo-v2 5", counts)
	}
	select {
	case c := <-backend:
		t.Errorf("echo-v2's mirror got a copy (%d bytes) of a stream routed elsewhere", len(c))
	default:
	}
}
