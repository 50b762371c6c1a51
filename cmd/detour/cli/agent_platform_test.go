package cli

import (
	"strings"
	"testing"
)

// What `detour agent` prints on a laptop (agent_other.go): one line, what and where instead.
func TestAgentLinuxOnly(t *testing.T) {
	for _, goos := range []string{"darwin", "windows"} {
		msg := agentLinuxOnly(goos).Error()
		if !strings.HasPrefix(msg, "agent: Linux only") || !strings.HasSuffix(msg, "run it in the pod, not on "+goos) || strings.Contains(msg, "\n") {
			t.Errorf("%s: %q", goos, msg)
		}
	}
}
