package devsession

import (
	"fmt"
	"time"
)

// NoticeKind is what a Notice tells.
type NoticeKind int

const (
	Registered NoticeKind = iota // the session is up: ID (none for an egress link alone), Transport
	FellBack                     // QUIC got no answer; HTTP/2 from now on: Text
	Legacy                       // the waypoint predates the version exchange: Text
	Lost                         // the tunnel was lost; reconnecting for Grace: ID, Err
	Back                         // the session is back: ID, Transport, After (since Lost)
)

// Notice is something the developer should be told, as it happens.
type Notice struct {
	Kind      NoticeKind
	ID        string
	Transport string
	Text      string
	Err       error
	Grace     time.Duration
	After     time.Duration
}

// String is the line to print.
func (n Notice) String() string {
	switch {
	case n.ID == "" && n.Kind == Registered: // a tunnel for the egress link only
		return fmt.Sprintf("the egress link over %s", n.Transport)
	case n.ID == "" && n.Kind == Lost:
		return fmt.Sprintf("the tunnel to the waypoint was lost (%v); reconnecting for up to %v (new connections to the cluster wait for it meanwhile)", n.Err, n.Grace)
	case n.ID == "" && n.Kind == Back:
		return fmt.Sprintf("back: the egress link over %s after %v", n.Transport, n.After.Round(100*time.Millisecond))
	}
	switch n.Kind {
	case Registered:
		return fmt.Sprintf("session %s over %s", n.ID, n.Transport)
	case Lost:
		return fmt.Sprintf("the tunnel to the waypoint was lost (%v); reconnecting for up to %v to resume session %s (matched traffic goes to the real service meanwhile)",
			n.Err, n.Grace, n.ID)
	case Back:
		return fmt.Sprintf("back: session %s resumed over %s after %v", n.ID, n.Transport, n.After.Round(100*time.Millisecond))
	}
	return n.Text
}
