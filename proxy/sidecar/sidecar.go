// Package sidecar is the data path of the sidecar-mode fallback (`detour agent`): it takes the
// connections the agent's rules redirect and hands each to the whole-stream steal session of its
// original port, or on to the application on loopback. The rules themselves (iptables,
// conntrack, SO_ORIGINAL_DST) are package agent's; this package knows nothing of them.
package sidecar

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// Server takes the connections the rules redirect: a whole-stream steal on the original port
// gets them through its developer's tunnel; everything else goes on to the application on
// 127.0.0.1 (a connection the mesh's rules and ours both let through: not the sidecar's uid, and
// loopback).
type Server struct {
	Registry       *session.Registry
	Namespace, Pod string // the sessions' "service": the pod
	// OriginalDst is where a redirected connection was going (agent.OriginalDst on Linux).
	// Required.
	OriginalDst func(*net.TCPConn) (netip.AddrPort, error)
	Logger      *slog.Logger // nil means slog.Default()
	wg          sync.WaitGroup
}

// Serve accepts on l until ctx ends, then waits for its connections.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	defer s.wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("sidecar: accepting: %w", err)
		}
		s.wg.Go(func() { s.handle(ctx, c.(*net.TCPConn)) })
	}
}

func (s *Server) handle(ctx context.Context, c *net.TCPConn) {
	defer c.Close()
	orig, err := s.OriginalDst(c)
	if err != nil {
		s.log().Info("sidecar: a connection without its original destination", "from", c.RemoteAddr().String(), "err", err)
		return
	}
	port := orig.Port()
	for _, st := range s.Registry.For(s.Namespace, s.Pod, port) {
		if st.Spec.Mode != session.Steal || !st.Whole() {
			continue
		}
		m := tunnel.Meta{Kind: tunnel.KindTCP, Target: orig.String(), Source: c.RemoteAddr().String()}
		if handled, _, _ := st.Take(ctx, c, m, nil, 0); handled {
			return
		}
		break // the developer is gone: the application answers
	}
	app, err := (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		s.log().Info("sidecar: the application does not answer on loopback", "port", port, "err", err)
		return
	}
	hbone.Splice(c, app, 0)
}

// CheckSpec refuses what the sidecar fallback cannot do: it takes whole streams only (per-request
// filtering is the waypoint's).
func CheckSpec(spec tunnel.Spec) error {
	if spec.Mode != session.Steal || !spec.Filter.IsZero() {
		return fmt.Errorf("sidecar: the sidecar fallback takes whole streams only (steal, no filter); got %s %s",
			spec.Mode, strings.TrimSpace(fmt.Sprint(spec.Filter)))
	}
	return nil
}

func (s *Server) log() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}
