package cli

import (
	"os"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

// testXDG is the tests' $XDG_CONFIG_HOME: nothing there, so a developer's own
// ~/.config/detour/config.yaml never reaches a test.
const testXDG = "/nonexistent/detour-test-xdg"

// Every goroutine a test starts through this package ends with it.
func TestMain(m *testing.M) {
	os.Setenv("XDG_CONFIG_HOME", testXDG)
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "DETOUR_") {
			os.Unsetenv(name)
		}
	}
	goleak.VerifyTestMain(m)
}
