//go:build linux

// Package agent is detour's fallback for sidecar-mode pods, where no ztunnel carries inbound
// traffic and the waypoint cannot see it: inside the pod's network namespace it redirects what the
// Istio sidecar forwards to the application's ports (uid 1337, on loopback, to a local address)
// to its own listener, from where debug sessions take it. It writes only its own chain, hooked in
// one place; it never touches an ambient pod; it removes everything it added on exit and sweeps
// leftovers (after kill -9) on start.
package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/coreos/go-iptables/iptables"
	"golang.org/x/sys/unix"
)

// Mode is how a pod is meshed.
type Mode int

const (
	ModeNone    Mode = iota // not meshed
	ModeSidecar             // an istio-proxy sidecar: the agent's case
	ModeAmbient             // ztunnel: the waypoint's case, never the agent's
)

func (m Mode) String() string { return [...]string{"none", "sidecar", "ambient"}[m] }

// PodInfo is what mode detection reads from a Pod and its Namespace.
type PodInfo struct {
	NamespaceLabels, Labels, Annotations map[string]string
	Containers                           []string // names, init containers included
}

// Detect says how a pod is meshed, and why.
func Detect(p PodInfo) (Mode, string) {
	switch {
	case p.Annotations["ambient.istio.io/redirection"] == "enabled":
		return ModeAmbient, "annotation ambient.istio.io/redirection=enabled"
	case p.Labels["istio.io/dataplane-mode"] == "ambient":
		return ModeAmbient, "pod label istio.io/dataplane-mode=ambient"
	case p.NamespaceLabels["istio.io/dataplane-mode"] == "ambient" && p.Labels["istio.io/dataplane-mode"] != "none":
		return ModeAmbient, "namespace label istio.io/dataplane-mode=ambient"
	case slices.Contains(p.Containers, "istio-proxy"):
		return ModeSidecar, "container istio-proxy"
	case p.Annotations["sidecar.istio.io/status"] != "":
		return ModeSidecar, "annotation sidecar.istio.io/status"
	}
	return ModeNone, "no istio-proxy container and no ambient label or annotation"
}

// ErrAmbient: the network namespace carries ztunnel's in-pod redirection.
var ErrAmbient = errors.New("agent: this pod is in ambient mode (ztunnel's in-pod redirection is installed): " +
	"its traffic reaches detour through the waypoint, with no netfilter change; use `detour steal` against the waypoint. " +
	"The agent would fight ztunnel's rules (REDIRECT against its marks 0x539/0x111), so it refuses")

// Names of what the agent writes. Everything starts with DETOUR_ so Sweep can find it.
const (
	Table       = "nat"
	Chain       = "DETOUR_OUTPUT"
	ChainPrefix = "DETOUR_"
	hookChain   = "OUTPUT"
	// SidecarUID is the Istio sidecar's user (and group) ID.
	SidecarUID = 1337
)

// Rules are the agent's netfilter rules in the current network namespace.
type Rules struct {
	ipt *iptables.IPTables
	// RedirectPort is the agent's listener (on 127.0.0.1 and the pod's addresses).
	RedirectPort uint16
	// UID is the sidecar's user whose loopback connections to local addresses are redirected;
	// 0 means SidecarUID.
	UID uint32
}

// NewRules uses the iptables binary of this namespace (legacy or nft backend, as installed).
func NewRules(redirectPort uint16) (*Rules, error) {
	ipt, err := iptables.New()
	if err != nil {
		return nil, fmt.Errorf("agent: iptables: %w", err)
	}
	return &Rules{ipt: ipt, RedirectPort: redirectPort}, nil
}

func (r *Rules) uid() string {
	if r.UID == 0 {
		return strconv.Itoa(SidecarUID)
	}
	return strconv.FormatUint(uint64(r.UID), 10)
}

// CheckAmbient fails with ErrAmbient when ztunnel's in-pod redirection is present (its chains in
// mangle carry the 0x539/0x111 marks).
func (r *Rules) CheckAmbient() error {
	rules, err := r.ipt.List("mangle", "ISTIO_PRERT")
	if err != nil {
		return nil // no such chain: not ambient
	}
	for _, rule := range rules {
		if strings.Contains(rule, "0x539/0xfff") || strings.Contains(rule, "0x111/0xfff") {
			return ErrAmbient
		}
	}
	return nil
}

// redirect is the rule for one application port: the sidecar (uid 1337) connecting over loopback
// to a local address on that port. The application's own connections (another uid) and the
// sidecar's connections to other pods (not local, not loopback) are never matched.
func (r *Rules) redirect(port uint16) []string {
	return []string{"-p", "tcp", "-o", "lo", "-m", "addrtype", "--dst-type", "LOCAL", "--dport", strconv.Itoa(int(port)),
		"-m", "owner", "--uid-owner", r.uid(), "-m", "comment", "--comment", "detour agent",
		"-j", "REDIRECT", "--to-ports", strconv.Itoa(int(r.RedirectPort))}
}

var hook = []string{"-m", "comment", "--comment", "detour agent", "-j", Chain}

// Install redirects ports; it is idempotent (running it again adds nothing) and adds to an
// existing set.
func (r *Rules) Install(ports []uint16) error {
	exists, err := r.ipt.ChainExists(Table, Chain)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if !exists {
		if err := r.ipt.NewChain(Table, Chain); err != nil {
			return fmt.Errorf("agent: creating %s: %w", Chain, err)
		}
	}
	for _, p := range ports {
		if err := r.ipt.AppendUnique(Table, Chain, r.redirect(p)...); err != nil {
			return fmt.Errorf("agent: redirecting port %d: %w", p, err)
		}
	}
	// One jump, first in OUTPUT, before the mesh's chain.
	if ok, err := r.ipt.Exists(Table, hookChain, hook...); err != nil {
		return fmt.Errorf("agent: %w", err)
	} else if !ok {
		if err := r.ipt.Insert(Table, hookChain, 1, hook...); err != nil {
			return fmt.Errorf("agent: hooking %s into %s: %w", Chain, hookChain, err)
		}
	}
	return nil
}

// Remove deletes what Install added. Safe to call when nothing is installed.
func (r *Rules) Remove() error {
	return r.Sweep()
}

// Sweep removes every DETOUR_* chain in every table, and every rule that jumps to one: what a
// killed agent left behind.
func (r *Rules) Sweep() error {
	var errs []error
	for _, table := range []string{"nat", "filter", "mangle", "raw"} {
		chains, err := r.ipt.ListChains(table)
		if err != nil {
			continue // the table may not exist in this kernel
		}
		var ours []string
		for _, c := range chains {
			if strings.HasPrefix(c, ChainPrefix) {
				ours = append(ours, c)
			}
		}
		if len(ours) == 0 {
			continue
		}
		for _, c := range chains {
			rules, err := r.ipt.List(table, c)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			for _, rule := range rules {
				for _, o := range ours {
					if strings.HasPrefix(rule, "-A "+c+" ") && strings.HasSuffix(rule, "-j "+o) {
						if err := r.ipt.Delete(table, c, splitRule(rule)...); err != nil {
							errs = append(errs, fmt.Errorf("agent: deleting %q: %w", rule, err))
						}
					}
				}
			}
		}
		for _, o := range ours {
			if err := r.ipt.ClearAndDeleteChain(table, o); err != nil {
				errs = append(errs, fmt.Errorf("agent: deleting chain %s/%s: %w", table, o, err))
			}
		}
	}
	return errors.Join(errs...)
}

// splitRule turns "-A CHAIN args..." from iptables -S into the args, honouring double quotes.
func splitRule(rule string) []string {
	var out []string
	var cur strings.Builder
	quoted, started := false, false
	for _, ch := range rule {
		switch {
		case ch == '"':
			quoted, started = !quoted, true
		case ch == ' ' && !quoted:
			if started {
				out = append(out, cur.String())
				cur.Reset()
				started = false
			}
		default:
			cur.WriteRune(ch)
			started = true
		}
	}
	if started {
		out = append(out, cur.String())
	}
	return out[2:] // drop "-A CHAIN"
}

// OriginalDst is where a redirected connection was going (SO_ORIGINAL_DST).
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var addr netip.AddrPort
	var serr error
	err = raw.Control(func(fd uintptr) {
		// SO_ORIGINAL_DST (80) fills a sockaddr_in; the IPv6 mreq getter reads 20 bytes of it.
		m, err := unix.GetsockoptIPv6Mreq(int(fd), unix.IPPROTO_IP, 80)
		if err != nil {
			serr = err
			return
		}
		port := uint16(m.Multiaddr[2])<<8 | uint16(m.Multiaddr[3])
		addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte(m.Multiaddr[4:8])), port)
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("agent: SO_ORIGINAL_DST: %w", serr)
	}
	return addr, nil
}
