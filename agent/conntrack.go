//go:build linux

package agent

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/ti-mo/conntrack"
)

// inboundPassthrough is the source address Istio's sidecar binds when it forwards inbound
// traffic to the application.
var inboundPassthrough = netip.MustParseAddr("127.0.0.6")

// FlushRedirected deletes the conntrack entries of connections the sidecar already holds to the
// application on ports (from 127.0.0.6 or a local address, to a local address): NAT only applies
// to new flows, so without this a keep-alive connection opened before the agent would never be
// redirected. Its next packet is seen as new, redirected to a port with no such connection and
// reset; the sidecar reconnects, through the agent. The agent calls it again when it stops, after
// removing its rules, so no entry keeps a redirection to its closed port. Nothing else is touched:
// not the application's own connections to other pods, not flows on other ports. It returns how many it deleted.
func FlushRedirected(ports []uint16, local []netip.Addr) (int, error) {
	c, err := conntrack.Dial(nil)
	if err != nil {
		return 0, fmt.Errorf("agent: conntrack: %w", err)
	}
	defer c.Close()
	flows, err := c.Dump(nil)
	if err != nil {
		return 0, fmt.Errorf("agent: conntrack dump: %w", err)
	}
	isLocal := func(a netip.Addr) bool { return a.IsLoopback() || slices.Contains(local, a) }
	n := 0
	for _, f := range flows {
		o := f.TupleOrig
		if o.Proto.Protocol != 6 || !slices.Contains(ports, o.Proto.DestinationPort) {
			continue
		}
		src, dst := o.IP.SourceAddress, o.IP.DestinationAddress
		if !isLocal(dst) || !(src == inboundPassthrough || isLocal(src)) {
			continue
		}
		if err := c.Delete(f); err != nil {
			return n, fmt.Errorf("agent: conntrack delete: %w", err)
		}
		n++
	}
	return n, nil
}
