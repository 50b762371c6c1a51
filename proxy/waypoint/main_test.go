package waypoint_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every stream's goroutines (HTTP server, onward transports, splices) end with the stream.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
