package fault

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	it "github.com/detour-mesh/detour/integration"
)

// A port already taken at start (the health port; the tunnel's UDP half): `detour waypoint`
// exits 1 at once with one line naming the address and what to do, and leaves nothing listening.
func TestPortTaken(t *testing.T) {
	for _, tc := range []struct{ name, network, want string }{
		{"health", "tcp", `(health): address already in use; free the port, or set listeners.health in the config (another address, or "off")`},
		{"tunnel", "udp", `(tunnel, UDP): address already in use; free the port, or set listeners.tunnel in the config (another address, or "off")`},
	} {
		t.Run(tc.name+"-"+tc.network, func(t *testing.T) {
			b := newBed(t, bedOptions{})
			taken := fmt.Sprintf("127.0.0.1:%d", it.FreePort(t, "127.0.0.1"))
			if tc.network == "tcp" {
				it.ListenAt(t, taken)
			} else {
				pc, err := net.ListenPacket("udp", taken)
				if err != nil {
					t.Fatal(err)
				}
				defer pc.Close()
			}
			cfg := strings.Replace(b.config(selfIP), fmt.Sprintf(`%s: "127.0.0.1:0"`, tc.name), fmt.Sprintf(`%s: %q`, tc.name, taken), 1)
			path := filepath.Join(b.dir, "taken.yaml")
			if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			p := it.Start(t, exec.Command(detourBin, "waypoint", "--config", path))
			select {
			case <-p.Done:
			case <-time.After(10 * time.Second):
				c, err := net.DialTimeout("tcp", fmt.Sprintf("%s:%d", selfIP, b.port), time.Second)
				if err == nil {
					c.Close()
				}
				t.Fatalf("port %s taken: the waypoint still runs 10 s after its start (HBONE port accepting: %v), output %q",
					taken, err == nil, p.Output())
			}
			want := "detour: listening on " + taken + " " + tc.want + "\n"
			if code := p.ProcessState.ExitCode(); code != 1 || p.Output() != want {
				t.Fatalf("exit %d, output %q; want 1, %q", code, p.Output(), want)
			}
			if c, err := net.DialTimeout("tcp", fmt.Sprintf("%s:%d", selfIP, b.port), time.Second); err == nil {
				c.Close()
				t.Errorf("the HBONE port still accepts after the exit")
			}
		})
	}
}
