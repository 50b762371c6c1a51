package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeKubeconfig writes a kubeconfig of two contexts: kind-dev (current, namespace shop) and
// other (no namespace). Nothing is listening at its server.
func writeKubeconfig(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	doc := `apiVersion: v1
kind: Config
clusters:
- {name: kind, cluster: {server: "https://127.0.0.1:1"}}
users:
- {name: dev, user: {token: x}}
contexts:
- {name: kind-dev, context: {cluster: kind, user: dev, namespace: shop}}
- {name: other, context: {cluster: kind, user: dev}}
current-context: kind-dev
`
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Every mistake in a steal's flags is refused before any network call (the waypoint address
// below has nothing listening), in one line naming the flag.
func TestSessionBadInput(t *testing.T) {
	t.Chdir(t.TempDir()) // no .detour.yaml of the checkout's
	kubeconfig := writeKubeconfig(t)
	ok := []string{"--waypoint", "127.0.0.1:1", "--ca", "/nonexistent", "--id", "spiffe://cluster.local/ns/dev/sa/alice", "--to", "8080"}
	with := func(extra ...string) []string { return append(append([]string{"steal", "svc/web"}, ok...), extra...) }
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"steal"}, "steal takes 1 argument, got 0; usage: detour steal svc/NAME[:PORT] --to HOST:PORT [--waypoint ADDR] [flags]"},
		{[]string{"steal", "svc/a", "svc/b"}, `steal takes 1 argument, got 2 (["svc/a" "svc/b"]); usage: detour steal svc/NAME[:PORT] --to HOST:PORT [--waypoint ADDR] [flags]`},
		{[]string{"mirror"}, "mirror takes 1 argument, got 0; usage: detour mirror svc/NAME[:PORT] --to HOST:PORT [--waypoint ADDR] [flags]"},
		{[]string{"sessions", "x"}, `sessions takes no arguments, got 1 (["x"]); usage: detour sessions --waypoint ADDR [-o json|yaml] [flags]`},
		{[]string{"doctor", "svc/a", "svc/b"}, `doctor takes at most 1 argument, got 2 (["svc/a" "svc/b"]); usage: detour doctor -n NAMESPACE [svc/NAME] [flags]`},
		{[]string{"run"}, "run takes at least 1 argument, got 0; usage: detour run --target svc/NAME [--steal|--mirror --to HOST:PORT] -- CMD ARGS... [flags]"},
		{with("--header", "x-dev: alice", "--header", "x dev=1"), `--header "x dev=1": "x dev" is not a header name (letters, digits and !#$%&'*+-.^_` + "`" + `|~ only)`},
		{with("--header", "x-dev~(("), "--header \"x-dev~((\": header regex: error parsing regexp: missing closing ): `((`"},
		{with("--path", "*"), "--path \"*\": path regex: error parsing regexp: missing argument to repetition operator: `*`"},
		{with("--method", "GET /"), `--method "GET /": not an HTTP method`},
		{with("--to", "127.0.0.1"), `--to "127.0.0.1": port "127.0.0.1" is not a number from 1 to 65535`},
		{[]string{"steal", "svc/web", "--waypoint", "127.0.0.1:1", "--ca", "/x", "--id", "spiffe://td/a"}, "--to is required: where your local app listens, PORT (on 127.0.0.1) or HOST:PORT"},
		{with("--port-forward", "istio-system"), "--waypoint and --port-forward exclude each other: give one (a port-forward finds the waypoint's pod itself)"},
		{[]string{"sessions", "end", "0123456789ab"}, "--waypoint or --port-forward is required"},
		{[]string{"sessions", "end"}, "end takes 1 argument, got 0; usage: detour sessions end ID --waypoint ADDR [flags]"},
		{[]string{"steal", "svc/web", "--transport", "quic", "--ca", "/x", "--id", "spiffe://td/a", "--to", "1"},
			"--transport quic needs --waypoint: without it the waypoint is reached by a port-forward, which carries TCP only (h2)"},
		{with("--transport", "udp"), `--transport "udp": want quic or h2`},
		{with("--force"), "--force only applies with --bind: add --bind, or drop --force"},
		{[]string{"steal", "svc/web", "--port-forward", "ns", "--transport", "quic", "--ca", "/x", "--id", "spiffe://td/a", "--to", "1"},
			"--transport quic and --port-forward exclude each other: a port-forward carries TCP only (h2)"},
		{[]string{"steal", "svc/web", "--port-forward", "/x", "--ca", "/x", "--id", "spiffe://td/a", "--to", "1"}, `--port-forward "/x": want NAMESPACE or NAMESPACE/WAYPOINT`},
		{with("--waypoint-id", "waypoint"), `--waypoint-id "waypoint": scheme is missing or invalid`},
		{with("--service-account", "dev/alice"), "--service-account and --ca exclude each other: give one identity"},
		{with("--cert", "c.pem"), "--ca and --cert exclude each other: give one identity"},
		{[]string{"steal", "svc/web", "--waypoint", "127.0.0.1:1", "--to", "1"},
			"an identity is required: --service-account NS/NAME (istiod's CA), --ca DIR --id SPIFFE-ID, or --cert, --key and --bundle"},
		{[]string{"steal", "svc/web", "--waypoint", "127.0.0.1:1", "--to", "1", "--ca", "/x"}, "--ca and --id go together: the dev CA mints the SPIFFE ID"},
		{[]string{"steal", "svc/web", "--waypoint", "127.0.0.1:1", "--to", "1", "--cert", "c"}, "--cert, --key and --bundle go together: --bundle and --key missing"},
		{[]string{"steal", "svc/web", "--waypoint", "127.0.0.1:1", "--to", "1", "--ca", "/x", "--id", "td/a"}, `--id "td/a": scheme is missing or invalid`},
		{[]string{"steal", "svc/web", "--waypoint", "127.0.0.1:1", "--to", "1", "--service-account", "alice"}, `--service-account "alice": want NAMESPACE/NAME`},
		{[]string{"steal", "svc/web", "--waypoint", "127.0.0.1:1", "--to", "1", "--ca", "/x", "--id", "spiffe://td/a", "--istiod", "x:1"},
			"--istiod and --mesh-root are for --service-account only"},
		{[]string{"steal", "web", "--waypoint", "127.0.0.1:1", "--to", "1", "--ca", "/x", "--id", "spiffe://td/a"},
			`target "web": want svc/NAME[:PORT] (or pod/NAME:PORT for a sidecar pod's agent)`},
		{with("--context", "nowhere", "--kubeconfig", kubeconfig), `--context nowhere: mesh: kubeconfig: context "nowhere" not found`},
		{[]string{"run", "--target", "svc/web", "--waypoint", "127.0.0.1:1", "--ca", "/x", "--id", "spiffe://td/a", "--header", "x-dev=a", "--", "true"},
			"--header needs --steal or --mirror (it says where and what to take)"},
		{[]string{"run", "--target", "svc/web", "--waypoint", "127.0.0.1:1", "--ca", "/x", "--id", "spiffe://td/a", "--steal", "--mirror", "--to", "1", "--", "true"},
			"--steal and --mirror exclude each other"},
		{[]string{"run", "--target", "svc/web", "--port-forward", "ns", "--waypoint", "127.0.0.1:1", "--ca", "/x", "--id", "spiffe://td/a", "--", "true"},
			"--waypoint and --port-forward exclude each other: give one (a port-forward finds the waypoint's pod itself)"},
		{[]string{"sessions", "-o", "table"}, `--output "table": want json or yaml`},
		{[]string{"doctor", "-o", "table"}, `--output "table": want json or yaml`},
		{[]string{"status", "-o", "table"}, `--output "table": want json or yaml`},
		{[]string{"steal", "svc/web", "--profile", "dev"}, "--profile dev: no config file (.detour.yaml here or in a parent directory, or " + testXDG + "/detour/config.yaml)"},
	} {
		code, out, errOut := run(t, tc.args...)
		if want := "detour: " + tc.want + "\n"; code != 1 || errOut != want || out != "" {
			t.Errorf("%q:\nexit %d, stdout %q, stderr %q\nwant 1, %q", tc.args, code, out, errOut, want)
		}
	}
}

// Without --waypoint and --port-forward a steal looks the service's waypoint up through the
// kubeconfig (in the context's namespace); one that cannot be read says so in one line.
// mesh.TestFindWaypoint covers the resolution itself.
func TestFindWaypointUnreachable(t *testing.T) {
	t.Chdir(t.TempDir())
	code, out, errOut := run(t, "steal", "svc/web", "--kubeconfig", writeKubeconfig(t), "--ca", "/x", "--id", "spiffe://td/a", "--to", "1")
	want := "detour: no --waypoint or --port-forward, and the service's waypoint was not found: mesh: finding the waypoint of shop/web: "
	if code != 1 || out != "" || !strings.HasPrefix(errOut, want) || strings.Count(errOut, "\n") != 1 {
		t.Errorf("exit %d, stdout %q, stderr %q, want %q...", code, out, errOut, want)
	}
}
