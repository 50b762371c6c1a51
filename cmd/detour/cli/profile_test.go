package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sync/errgroup"

	"github.com/detour-mesh/detour/hbone"
	"github.com/detour-mesh/detour/identity/devca"
	"github.com/detour-mesh/detour/proxy/config"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// testWaypoint runs the demo's waypoint (service echo.demo, alice may steal it) in the test, and
// returns its tunnel address, its dev CA's directory and a client of namespace default.
func testWaypoint(t *testing.T) (tunnelAddr, caDir string, client *demoClient) {
	t.Helper()
	quiet := slog.New(slog.DiscardHandler)
	caDir = filepath.Join(t.TempDir(), "ca")
	ca, err := devca.Init(caDir, demoTD)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := startDemoPods(ca, demoPods, quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pods.stop)
	cfg, err := config.Decode([]byte(demoConfig(caDir, demoPods, demoHBONEPort)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan listening, 1)
	var g errgroup.Group
	g.Go(func() error { return runWaypoint(ctx, cfg, quiet, io.Discard, ready, pods.dial) })
	t.Cleanup(func() {
		cancel()
		if err := g.Wait(); err != nil {
			t.Error(err)
		}
	})
	var addrs listening
	select {
	case addrs = <-ready:
	case <-time.After(30 * time.Second):
		t.Fatal("the waypoint did not start")
	}
	opts, err := demoDialOpts(ca, demoSleep)
	if err != nil {
		t.Fatal(err)
	}
	dialer := &hbone.Dialer{Logger: quiet}
	t.Cleanup(func() { dialer.Close() })
	client = newDemoClient(dialer, addrs.HBONE, opts, 1)
	t.Cleanup(client.http.CloseIdleConnections)
	return addrs.Tunnel, caDir, client
}

// laptopApp answers "laptop" on a loopback port.
func laptopApp(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pod", "laptop")
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

func writeFile(t *testing.T, path, doc string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
}

// A profile alone (no flag but the target) starts a working steal: the .detour.yaml of a parent
// directory gives the waypoint, the identity (a dev CA relative to the file), the namespace, two
// header conditions (both must hold) and the local port.
func TestProfileAloneSteals(t *testing.T) {
	tunnelAddr, caDir, client := testWaypoint(t)
	app := laptopApp(t)
	_, port, _ := net.SplitHostPort(app)
	project := t.TempDir()
	if err := os.Rename(caDir, filepath.Join(project, "devca")); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(project, ".detour.yaml"), fmt.Sprintf(`# alice's project
defaultProfile: demo
profiles:
  demo:
    waypoint: %s
    transport: h2
    identity: {ca: devca, id: %q}
    namespace: demo
    headers: ["x-dev: alice", "x-team~^pay"]
    to: %s
  elsewhere:
    waypoint: 127.0.0.1:1
`, tunnelAddr, demoDeveloper, port))
	if err := os.MkdirAll(filepath.Join(project, "src", "cmd"), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Chdir(filepath.Join(project, "src", "cmd"))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errOut syncBuffer
	done := make(chan int, 1)
	go func() { done <- Run(ctx, []string{"steal", "svc/echo"}, &out, &errOut) }()
	want := "stealing demo/echo port (its only port) (header x-dev=alice, header x-team~^pay) -> 127.0.0.1:" + port + "; session "
	deadline := time.After(30 * time.Second)
	for !strings.Contains(out.String(), want) {
		select {
		case code := <-done:
			t.Fatalf("exit %d:\n%s\n%s", code, out.String(), errOut.String())
		case <-deadline:
			t.Fatalf("not stealing:\n%s\n%s", out.String(), errOut.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	for _, tc := range []struct {
		header http.Header
		want   string
	}{
		{http.Header{"X-Dev": {"alice"}, "X-Team": {"payments"}}, "laptop"},
		{http.Header{"X-Dev": {"alice"}}, "pod 10.244.0."},
		{http.Header{"X-Team": {"payments"}}, "pod 10.244.0."},
	} {
		code, _, pod, err := client.do(ctx, "GET", "/", tc.header, nil)
		if err != nil || code != 200 || !strings.HasPrefix(pod, tc.want) {
			t.Errorf("%v: %d from %q (%v), want %s", tc.header, code, pod, err, tc.want)
		}
	}
	// detour sessions, from the same profile, lists it; -o json and -o yaml parse.
	code, listed, errList := run(t, "sessions", "-o", "json")
	var sessions []tunnel.SessionInfo
	if err := json.Unmarshal([]byte(listed), &sessions); err != nil || code != 0 || len(sessions) != 1 ||
		sessions[0].Holder != demoDeveloper || sessions[0].Spec.Service != "echo" || len(sessions[0].Spec.Filter.HeaderMatches()) != 2 || sessions[0].Requests != 1 {
		t.Errorf("sessions -o json: exit %d, %v, %+v\n%s%s", code, err, sessions, listed, errList)
	}
	code, listed, errList = run(t, "sessions", "-o", "yaml")
	var fromYAML []map[string]any
	if err := yaml.Unmarshal([]byte(listed), &fromYAML); err != nil || code != 0 || len(fromYAML) != 1 || fromYAML[0]["id"] != sessions[0].ID {
		t.Errorf("sessions -o yaml: exit %d, %v, %+v\n%s%s", code, err, fromYAML, listed, errList)
	}
	// detour sessions end: an unknown ID gets one line; the session's own ID ends it, and the
	// steal exits saying why.
	if code, _, errEnd := run(t, "sessions", "end", "0123456789ab"); code != 1 ||
		errEnd != "detour: the waypoint refused: session: no session 0123456789ab on this waypoint (`detour sessions` lists the ones you may see)\n" {
		t.Errorf("sessions end of an unknown ID: exit %d, %q", code, errEnd)
	}
	if code, ended, errEnd := run(t, "sessions", "end", sessions[0].ID); code != 0 || ended != "session "+sessions[0].ID+" ended\n" {
		t.Errorf("sessions end: exit %d, %q, %q", code, ended, errEnd)
	}
	if code := <-done; code != 1 || !strings.Contains(errOut.String(), "the waypoint ended the session: ended by its developer (detour sessions end)") {
		t.Fatalf("the steal after sessions end: exit %d:\n%s\n%s", code, out.String(), errOut.String())
	}
}

// Flags override DETOUR_* variables, which override the profile; the namespace comes from the
// kubeconfig context when nothing gives one. detour status -o json|yaml parses.
func TestSettingsPrecedence(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	kubeconfig := writeKubeconfig(t)
	writeFile(t, filepath.Join(dir, ".detour.yaml"), fmt.Sprintf(`profiles:
  default:
    waypoint: 10.0.0.1:15009
    identity: {serviceAccount: dev/alice}
    kubeconfig: %s
    namespace: shop-from-profile
    headers: [x-dev=alice]
    to: 8080
  ctx:
    portForward: istio-system/detour
    identity: {cert: c.pem, key: k.pem, bundle: b.pem}
    kubeconfig: %s
    context: other
`, kubeconfig, kubeconfig))
	status := func(args ...string) statusInfo {
		t.Helper()
		code, out, errOut := run(t, append([]string{"status", "-o", "json"}, args...)...)
		var s statusInfo
		if err := json.Unmarshal([]byte(out), &s); err != nil || code != 0 {
			t.Fatalf("%v: exit %d, %v\n%s\n%s", args, code, err, out, errOut)
		}
		return s
	}
	s := status()
	if s.Profile != "default" || s.Config != filepath.Join(dir, ".detour.yaml") || s.Namespace != "shop-from-profile" || s.Waypoint != "10.0.0.1:15009" ||
		s.To != "127.0.0.1:8080" || s.Filter.Header != "x-dev" || s.Identity != "service account dev/alice (istiod's CA at istiod.istio-system.svc:15012)" ||
		s.Context != "kind-dev" || !strings.HasPrefix(s.Sources["namespace"], "profile default (") {
		t.Errorf("profile: %+v", s)
	}
	t.Setenv("DETOUR_NAMESPACE", "from-env")
	t.Setenv("DETOUR_TO", "9090")
	if s = status(); s.Namespace != "from-env" || s.Sources["namespace"] != "$DETOUR_NAMESPACE" || s.To != "127.0.0.1:9090" {
		t.Errorf("env over profile: %+v", s)
	}
	if s = status("-n", "from-flag", "--to", "7070"); s.Namespace != "from-flag" || s.Sources["namespace"] != "--namespace" || s.To != "127.0.0.1:7070" {
		t.Errorf("flag over env: %+v", s)
	}
	t.Setenv("DETOUR_NAMESPACE", "")
	// Profile ctx names no namespace: its kubeconfig context's (none there: default); the current
	// context's is shop.
	if s = status("--profile", "ctx"); s.Profile != "ctx" || s.Context != "other" || s.Namespace != "default" || s.PortForward != "istio-system/detour" ||
		s.Transport != "h2" || s.Identity != "files "+filepath.Join(dir, "c.pem")+", "+filepath.Join(dir, "k.pem")+", "+filepath.Join(dir, "b.pem") {
		t.Errorf("--profile ctx: %+v", s)
	}
	if s = status("--profile", "ctx", "--context", "kind-dev"); s.Namespace != "shop" {
		t.Errorf("--context kind-dev: %+v", s)
	}
	t.Setenv("DETOUR_PROFILE", "ctx")
	if s = status(); s.Profile != "ctx" {
		t.Errorf("$DETOUR_PROFILE: %+v", s)
	}
	code, out, errOut := run(t, "status", "-o", "yaml")
	var y map[string]any
	if err := yaml.Unmarshal([]byte(out), &y); err != nil || code != 0 || y["profile"] != "ctx" {
		t.Fatalf("status -o yaml: %d %v %v %q", code, err, y, errOut)
	}
	code, out, _ = run(t, "status")
	if code != 0 || !strings.Contains(out, "waypoint:   port-forward to istio-system/detour over h2\n") || !strings.Contains(out, "  context:  from profile ctx (") {
		t.Errorf("status: %d\n%s", code, out)
	}
	// What status finds wrong, it says, and exits 1.
	code, out, errOut = run(t, "status", "-o", "json", "--header", "bad name")
	var s2 statusInfo
	if err := json.Unmarshal([]byte(out), &s2); err != nil || code != 1 || len(s2.Problems) != 1 || errOut != "detour: 1 problem(s) found\n" {
		t.Errorf("status with a bad header: %d %v %+v %q", code, err, s2, errOut)
	}
}

// The config file is decoded strictly: an unknown field is refused with its line, before
// anything else happens.
func TestConfigFileStrict(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	path := filepath.Join(dir, ".detour.yaml")
	for _, tc := range []struct{ doc, args, want string }{
		{"profiles:\n  a:\n    waypiont: x:1\n", "", `config ` + path + `: line 3: unknown field "waypiont"`},
		{"profiles:\n  a:\n    identity: {ca: x, sa: y}\n", "", `config ` + path + `: line 3: unknown field "sa"`},
		{"profile: {}\n", "", `config ` + path + `: line 1: unknown field "profile"`},
		{"defaultProfile: b\nprofiles: {a: {}}\n", "", "config " + path + ": defaultProfile b: no such profile (it has: a)"},
		{"profiles: {a: {to: [1]}}\n", "", "config " + path + ": line 1: want a port or HOST:PORT"},
		{"profiles: {a: {}}\n", "--profile b", "--profile b: no such profile in " + path + " (it has: a)"},
		{"profiles:\n\t- a\n", "", "config " + path + ": line 2: found character that cannot start any token"},
	} {
		writeFile(t, path, tc.doc)
		args := []string{"steal", "svc/web"}
		if tc.args != "" {
			args = append(args, strings.Fields(tc.args)...)
		}
		if code, _, errOut := run(t, args...); code != 1 || errOut != "detour: "+tc.want+"\n" {
			t.Errorf("%q: exit %d, %q\nwant %q", tc.doc, code, errOut, tc.want)
		}
	}
	t.Setenv("DETOUR_CONFIG", filepath.Join(dir, "nope.yaml"))
	if code, _, errOut := run(t, "steal", "svc/web"); code != 1 || errOut != "detour: $DETOUR_CONFIG: stat "+filepath.Join(dir, "nope.yaml")+": no such file or directory\n" {
		t.Errorf("$DETOUR_CONFIG missing: %d %q", code, errOut)
	}
}

// The README's profile example decodes (strictly) and names its default profile.
func TestReadmeProfileExample(t *testing.T) {
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(readme), "```yaml\n")
	doc, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("README has no yaml block")
	}
	path := filepath.Join(t.TempDir(), "config.yaml")
	writeFile(t, path, doc)
	cfg, err := decodeCLIConfig(path)
	if err != nil || cfg.Profiles[cfg.DefaultProfile] == nil || cfg.Profiles["dev"].Identity.ServiceAccount != "dev/alice" {
		t.Fatalf("%+v %v", cfg, err)
	}
}

func FuzzCLIConfig(f *testing.F) {
	f.Add([]byte("defaultProfile: a\nprofiles:\n  a:\n    waypoint: x:1\n    identity: {ca: d, id: spiffe://td/a}\n    headers: [x=1]\n    to: 8080\n"))
	f.Add([]byte("profiles: {a: {to: [1]}}"))
	f.Add([]byte("profiles:\n  a: &x {namespace: n}\n  b: *x\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		cfg, err := parseCLIConfig("f", doc)
		if err != nil {
			return
		}
		// What decodes gives flag values for every profile, and names an existing default.
		for _, p := range cfg.Profiles {
			if p != nil {
				p.flags("/d")
			}
		}
		if cfg.DefaultProfile != "" && cfg.Profiles[cfg.DefaultProfile] == nil {
			if _, ok := cfg.Profiles[cfg.DefaultProfile]; !ok {
				t.Fatalf("default %q is not a profile", cfg.DefaultProfile)
			}
		}
	})
}
