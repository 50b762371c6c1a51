package tunnel

import (
	"testing"

	"go.uber.org/goleak"
)

// Every goroutine a test starts through this package ends with it.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
