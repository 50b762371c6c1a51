package cli

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"

	"github.com/detour-mesh/detour/proxy/config"
)

// listenTCPUDP listens on addr with TCP and UDP on one port number. With port 0, the number TCP
// got may be taken on UDP (or the other way): it tries again, up to 20 times.
func listenTCPUDP(addr string) (net.Listener, net.PacketConn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, err
	}
	var errs []error
	for range 20 {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, nil, err
		}
		pc, err := net.ListenPacket("udp", net.JoinHostPort(host, strconv.Itoa(l.Addr().(*net.TCPAddr).Port)))
		if err == nil {
			return l, pc, nil
		}
		l.Close()
		if port != "0" {
			return nil, nil, fmt.Errorf("UDP on the TCP port: %w", err)
		}
		errs = append(errs, err)
	}
	return nil, nil, fmt.Errorf("no port free on both TCP and UDP: %w", errors.Join(errs...))
}

// waypointListeners are every socket the waypoint serves, bound together before any is served,
// so that a port in use ends the process at start instead of leaving some listeners half served.
type waypointListeners struct {
	hbone     net.Listener
	health    net.Listener   // nil when off
	tunnel    net.Listener   // nil when off; HTTP/2 tunnels
	tunnelUDP net.PacketConn // nil when off; QUIC tunnels
}

// listenWaypoint binds the listeners ls names (health and tunnel unless "off"), or none.
func listenWaypoint(ls config.Listeners) (*waypointListeners, error) {
	w := &waypointListeners{}
	var err error
	if w.hbone, err = net.Listen("tcp", ls.HBONE); err != nil {
		return nil, &listenError{Addr: ls.HBONE, Name: "hbone", Key: "listeners.hbone", Err: err}
	}
	if ls.Tunnel != "off" {
		if w.tunnel, w.tunnelUDP, err = listenTCPUDP(ls.Tunnel); err != nil {
			w.Close()
			return nil, &listenError{Addr: ls.Tunnel, Name: "tunnel", Key: "listeners.tunnel", Off: true, Err: err}
		}
	}
	if ls.Health != "off" {
		if w.health, err = net.Listen("tcp", ls.Health); err != nil {
			w.Close()
			return nil, &listenError{Addr: ls.Health, Name: "health", Key: "listeners.health", Off: true, Err: err}
		}
	}
	return w, nil
}

// Close closes every listener (those already handed to a server too: closing twice is harmless).
func (w *waypointListeners) Close() {
	for _, l := range []net.Listener{w.hbone, w.health, w.tunnel} {
		if l != nil {
			l.Close()
		}
	}
	if w.tunnelUDP != nil {
		w.tunnelUDP.Close()
	}
}

// listenError says which listener could not be bound, why, and what to do: one line such as
// "listening on 127.0.0.1:15021 (health): address already in use; free the port, or set
// listeners.health in the config (another address, or "off")".
type listenError struct {
	Addr string // as configured
	Name string // the listener's role
	Key  string // the config field that sets it
	Off  bool   // whether the field takes "off"
	Err  error
}

func (e *listenError) Error() string {
	name, reason := e.Name, e.Err.Error()
	var op *net.OpError
	if errors.As(e.Err, &op) && e.Name == "tunnel" {
		name += ", " + strings.ToUpper(op.Net)
	}
	var errno syscall.Errno
	if errors.As(e.Err, &errno) {
		reason = errno.Error()
	}
	hint := "set " + e.Key + " in the config (another address"
	if e.Off {
		hint += `, or "off"`
	}
	hint += ")"
	if errors.Is(e.Err, syscall.EADDRINUSE) {
		hint = "free the port, or " + hint
	}
	return fmt.Sprintf("listening on %s (%s): %s; %s", e.Addr, name, reason, hint)
}

func (e *listenError) Unwrap() error { return e.Err }
