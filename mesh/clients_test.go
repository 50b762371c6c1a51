package mesh

import (
	"os"
	"path/filepath"
	"testing"
)

const testKubeconfig = `apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:6443"}
contexts:
- name: ctx
  context: {cluster: c, user: u}
current-context: ctx
users:
- name: u
  user: {token: t}
`

// The CLI's clients are limited to kubectl's rates, not client-go's 5 requests per second
// (`detour install` waited ~20 s on its own access reviews under that).
func TestUserClientsRate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, []byte(testKubeconfig), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := UserClientsContext(path, "")
	if err != nil {
		t.Fatal(err)
	}
	if c.Config.QPS != userQPS || c.Config.Burst != userBurst {
		t.Errorf("user clients: QPS %v burst %d, want %v and %d", c.Config.QPS, c.Config.Burst, userQPS, userBurst)
	}
	rc, err := UserConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if rc.QPS != userQPS || rc.Burst != userBurst {
		t.Errorf("user config: QPS %v burst %d, want %v and %d", rc.QPS, rc.Burst, userQPS, userBurst)
	}
	w, err := WorkloadClients(path)
	if err != nil {
		t.Fatal(err)
	}
	if w.Config.QPS != 0 {
		t.Errorf("the waypoint's clients keep client-go's default rate, got QPS %v", w.Config.QPS)
	}
}
