package hbone

import "testing"

// TestWaitWrittenBothReady: a writer that wrote a Write's last frame and then exited (the peer
// read the bytes and closed the connection at once) readies both the item's answer and
// writerDone. The Write succeeded and must say so; believing writerDone failed a delivered
// message one time in two (seen as a rare "connection closed" on a dev tunnel's Hello to a
// waypoint that closes the tunnel on a Hello it cannot read).
func TestWaitWrittenBothReady(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer *bool // nil: the writer exited before taking the item
		want   bool
	}{
		{"written", ptr(true), true},
		{"dropped", ptr(false), false},
		{"never taken", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for range 200 { // select picks at random among ready cases
				s := &Stream{c: &conn{writerDone: make(chan struct{})}}
				ch := getNotify()
				if tc.answer != nil {
					ch <- *tc.answer
				}
				close(s.c.writerDone)
				if got := s.waitWritten(ch); got != tc.want {
					t.Fatalf("waitWritten = %v, want %v", got, tc.want)
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
