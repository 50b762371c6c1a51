package cli

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// detour completion SHELL prints a script for each shell that asks detour for its candidates;
// those name every subcommand, `sessions end`, and (through the kubeconfig) the cluster's
// namespaces for -n and services for svc/NAME.
func TestCompletion(t *testing.T) {
	t.Chdir(t.TempDir())
	for shell, want := range map[string]string{"bash": "__start_detour", "zsh": "#compdef detour", "fish": "complete -c detour", "powershell": "Register-ArgumentCompleter"} {
		code, out, errOut := run(t, "completion", shell)
		if code != 0 || !strings.Contains(out, want) || !strings.Contains(out, "__complete") {
			t.Errorf("completion %s: exit %d, %d bytes without %q or __complete; %s", shell, code, len(out), want, errOut)
		}
	}
	candidates := func(args ...string) []string {
		t.Helper()
		code, out, errOut := run(t, append([]string{"__complete"}, args...)...)
		if code != 0 {
			t.Fatalf("__complete %q: exit %d: %s", args, code, errOut)
		}
		var names []string
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			if name, _, _ := strings.Cut(line, "\t"); !strings.HasPrefix(name, ":") {
				names = append(names, name)
			}
		}
		return names
	}
	top := strings.Join(candidates(""), " ")
	for _, sub := range []string{"steal", "mirror", "run", "sessions", "status", "doctor", "install", "version", "completion", "demo", "waypoint"} {
		if !strings.Contains(" "+top+" ", " "+sub+" ") {
			t.Errorf("__complete \"\": %q has no %s", top, sub)
		}
	}
	if got := candidates("sessions", ""); !strings.Contains(strings.Join(got, " "), "end") {
		t.Errorf("__complete sessions: %q has no end", got)
	}

	// A stand-in API server: two namespaces, and the services of shop.
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/api/v1/namespaces":
			fmt.Fprint(w, `{"kind":"NamespaceList","apiVersion":"v1","items":[{"metadata":{"name":"shop"}},{"metadata":{"name":"default"}}]}`)
		case "/api/v1/namespaces/shop/services":
			fmt.Fprint(w, `{"kind":"ServiceList","apiVersion":"v1","items":[{"metadata":{"name":"web"}},{"metadata":{"name":"cart"}},{"metadata":{"name":"worker"}}]}`)
		default:
			http.NotFound(w, r)
		}
	}))
	defer api.Close()
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: %q}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: dev, context: {cluster: c, user: u, namespace: shop}}]
current-context: dev
`, api.URL)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"steal", "--kubeconfig", kubeconfig, "svc/w"}, "svc/web svc/worker"},
		{[]string{"mirror", "--kubeconfig", kubeconfig, ""}, "svc/cart svc/web svc/worker"},
		{[]string{"run", "--kubeconfig", kubeconfig, "--target", "svc/c"}, "svc/cart"},
		{[]string{"steal", "--kubeconfig", kubeconfig, "-n", ""}, "default shop"},
		{[]string{"steal", "--kubeconfig", kubeconfig, "svc/web", ""}, ""}, // one target only
	} {
		if got := strings.Join(candidates(tc.args...), " "); got != tc.want {
			t.Errorf("__complete %q: %q, want %q", tc.args, got, tc.want)
		}
	}
}
