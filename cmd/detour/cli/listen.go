package cli

import (
	"errors"
	"fmt"
	"net"
	"strconv"
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
