package cli

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

// The CLI config file: profiles of the flags a developer would otherwise repeat. Where a
// setting comes from, strongest first: the command line, a DETOUR_* environment variable, the
// profile, the default. The file is the first of $DETOUR_CONFIG, .detour.yaml in the current
// directory or a parent, $XDG_CONFIG_HOME/detour/config.yaml (default ~/.config/detour/...);
// files are not merged. The profile is --profile, else $DETOUR_PROFILE, else the file's
// defaultProfile, else the one named "default" if there is one.
//
//	defaultProfile: shop
//	profiles:
//	  shop:
//	    portForward: istio-system/detour   # or waypoint: HOST:PORT (with transport: quic|h2)
//	    identity: {serviceAccount: dev/alice}  # or {ca: DIR, id: SPIFFE-ID}, or {cert, key, bundle}
//	    namespace: shop
//	    headers: ["x-dev=alice"]
//	    to: 8080

// Commands say with this annotation which settings a profile and the environment give them.
const (
	profileAnnotation = "detour.profile"
	profileAll        = "all"  // every setting (steal, mirror, run, sessions, status)
	profileKube       = "kube" // kubeconfig and context only
)

// sourceAnnotation marks a flag set from the environment or a profile, with where from.
const sourceAnnotation = "detour.source"

// typed reports whether flag name was given on the command line (not by the environment or a
// profile).
func typed(fl *pflag.FlagSet, name string) bool {
	f := fl.Lookup(name)
	return f != nil && f.Changed && f.Annotations[sourceAnnotation] == nil
}

// settingFlags are the flags a profile or a DETOUR_* variable may set, in the order applied.
var settingFlags = []string{"waypoint", "port-forward", "transport", "waypoint-id", "service-account", "istiod", "mesh-root",
	"ca", "id", "cert", "key", "bundle", "kubeconfig", "context", "namespace", "header", "path", "method", "to"}

// cliConfig is the CLI config file, decoded strictly: an unknown field is refused with its line.
type cliConfig struct {
	DefaultProfile string              `yaml:"defaultProfile"`
	Profiles       map[string]*profile `yaml:"profiles"`
}

// profile is one set of settings; every field is optional.
type profile struct {
	Waypoint    string          `yaml:"waypoint"`    // HOST:PORT of the waypoint's tunnel
	PortForward string          `yaml:"portForward"` // or NAMESPACE[/WAYPOINT], through the API server
	Transport   string          `yaml:"transport"`   // quic (default) or h2
	WaypointID  string          `yaml:"waypointID"`  // the waypoint's SPIFFE ID to insist on
	Identity    profileIdentity `yaml:"identity"`
	Kubeconfig  string          `yaml:"kubeconfig"` // relative to the file's directory
	Context     string          `yaml:"context"`
	Namespace   string          `yaml:"namespace"` // the service's
	Headers     []string        `yaml:"headers"`   // as --header, all to hold
	Path        string          `yaml:"path"`
	Method      string          `yaml:"method"`
	To          scalar          `yaml:"to"` // PORT or HOST:PORT
}

// profileIdentity is one of: serviceAccount (with istiod, meshRoot), ca and id, cert key and bundle.
// Files are relative to the config file's directory.
type profileIdentity struct {
	ServiceAccount string `yaml:"serviceAccount"`
	Istiod         string `yaml:"istiod"`
	MeshRoot       string `yaml:"meshRoot"`
	CA             string `yaml:"ca"`
	ID             string `yaml:"id"`
	Cert           string `yaml:"cert"`
	Key            string `yaml:"key"`
	Bundle         string `yaml:"bundle"`
}

// scalar is a YAML scalar taken as written (to: 8080 and to: "127.0.0.1:8080" alike).
type scalar string

func (s *scalar) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: want a port or HOST:PORT", n.Line)
	}
	*s = scalar(n.Value)
	return nil
}

// flags are the profile's settings as flag values, files resolved against dir.
func (p *profile) flags(dir string) map[string][]string {
	file := func(v string) string {
		if v == "" || filepath.IsAbs(v) {
			return v
		}
		if rest, ok := strings.CutPrefix(v, "~/"); ok {
			if home, err := os.UserHomeDir(); err == nil {
				return filepath.Join(home, rest)
			}
		}
		return filepath.Join(dir, v)
	}
	id := p.Identity
	m := map[string][]string{}
	for name, v := range map[string]string{"waypoint": p.Waypoint, "port-forward": p.PortForward, "transport": p.Transport,
		"waypoint-id": p.WaypointID, "service-account": id.ServiceAccount, "istiod": id.Istiod, "mesh-root": file(id.MeshRoot),
		"ca": file(id.CA), "id": id.ID, "cert": file(id.Cert), "key": file(id.Key), "bundle": file(id.Bundle),
		"kubeconfig": file(p.Kubeconfig), "context": p.Context, "namespace": p.Namespace, "path": p.Path, "method": p.Method,
		"to": string(p.To)} {
		if v != "" {
			m[name] = []string{v}
		}
	}
	if len(p.Headers) > 0 {
		m["header"] = p.Headers
	}
	return m
}

// settings find the config file and profile and apply them, and the environment, to a command's
// flags before it runs. Environment reads happen here, in cmd/, only.
type settings struct {
	lookupEnv func(string) (string, bool)
	profile   string // --profile

	// Set by apply: what was used, and where each flag's value came from.
	file, used string
	sources    map[string]string
}

// envName is the variable for a flag: --port-forward is DETOUR_PORT_FORWARD.
func envName(flag string) string {
	return "DETOUR_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

func (s *settings) env(name string) string {
	v, _ := s.lookupEnv(name)
	return v
}

// apply sets cmd's flags that the command line left unset: from the environment, then from the
// profile.
func (s *settings) apply(cmd *cobra.Command) error {
	mode := cmd.Annotations[profileAnnotation]
	fl := cmd.Flags()
	s.sources = map[string]string{}
	fl.Visit(func(f *pflag.Flag) { s.sources[f.Name] = "--" + f.Name })
	if mode == "" {
		return nil
	}
	names := settingFlags
	if mode == profileKube {
		names = []string{"kubeconfig", "context"}
	}
	set := func(name string, values []string, from string) error {
		if fl.Lookup(name) == nil || fl.Changed(name) {
			return nil
		}
		for _, v := range values {
			if err := fl.Set(name, v); err != nil {
				return fmt.Errorf("%s: %w", from, err)
			}
		}
		s.sources[name] = from
		return fl.SetAnnotation(name, sourceAnnotation, []string{from})
	}
	for _, name := range names {
		if v := s.env(envName(name)); v != "" {
			if err := set(name, []string{v}, "$"+envName(name)); err != nil {
				return err
			}
		}
	}
	p, err := s.load()
	if err != nil || p == nil {
		return err
	}
	values := p.flags(filepath.Dir(s.file))
	for _, name := range names {
		if err := set(name, values[name], fmt.Sprintf("profile %s (%s)", s.used, s.file)); err != nil {
			return err
		}
	}
	return nil
}

// load finds the config file and picks the profile; nil when there is none to use.
func (s *settings) load() (*profile, error) {
	name, from := s.profile, "--profile"
	if name == "" {
		name, from = s.env("DETOUR_PROFILE"), "$DETOUR_PROFILE"
	}
	path, err := s.find()
	if err != nil {
		return nil, err
	}
	if path == "" {
		if name != "" {
			return nil, fmt.Errorf("%s %s: no config file (.detour.yaml here or in a parent directory, or %s)", from, name, s.userConfig())
		}
		return nil, nil
	}
	cfg, err := decodeCLIConfig(path)
	if err != nil {
		return nil, err
	}
	s.file = path
	if name == "" {
		name, from = cfg.DefaultProfile, "defaultProfile"
		if _, ok := cfg.Profiles["default"]; name == "" && ok {
			name = "default"
		}
	}
	if name == "" {
		return nil, nil
	}
	p, ok := cfg.Profiles[name]
	if !ok {
		return nil, fmt.Errorf("%s %s: no such profile in %s (it has: %s)", from, name, path, strings.Join(profileNames(cfg), ", "))
	}
	s.used = name
	if p == nil {
		p = &profile{}
	}
	return p, nil
}

func profileNames(cfg *cliConfig) []string {
	var names []string
	for n := range cfg.Profiles {
		names = append(names, n)
	}
	slices.Sort(names)
	if len(names) == 0 {
		return []string{"none"}
	}
	return names
}

// find returns the config file's path, "" when there is none.
func (s *settings) find() (string, error) {
	if p := s.env("DETOUR_CONFIG"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("$DETOUR_CONFIG: %w", err)
		}
		return p, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		p := filepath.Join(dir, ".detour.yaml")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	if p := s.userConfig(); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", nil
}

// userConfig is $XDG_CONFIG_HOME/detour/config.yaml, or ~/.config/detour/config.yaml.
func (s *settings) userConfig() string {
	base := s.env("XDG_CONFIG_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		base = filepath.Join(home, ".config")
	}
	return filepath.Join(base, "detour", "config.yaml")
}

// typeErrLine is one of yaml's strict-decoding complaints.
var typeErrLine = regexp.MustCompile(`^line (\d+): field (\S+) not found in type \S+$`)

// maxCLIConfig bounds the config file.
const maxCLIConfig = 1 << 20

// decodeCLIConfig reads the file at path strictly.
func decodeCLIConfig(path string) (*cliConfig, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	defer f.Close()
	doc, err := io.ReadAll(io.LimitReader(f, maxCLIConfig+1))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if len(doc) > maxCLIConfig {
		return nil, fmt.Errorf("config %s: larger than %d bytes", path, maxCLIConfig)
	}
	return parseCLIConfig(path, doc)
}

// parseCLIConfig decodes doc (the file at path) strictly.
func parseCLIConfig(path string, doc []byte) (*cliConfig, error) {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var cfg cliConfig
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			msgs := make([]string, len(te.Errors))
			for i, e := range te.Errors {
				if m := typeErrLine.FindStringSubmatch(e); m != nil {
					e = fmt.Sprintf("line %s: unknown field %q", m[1], m[2])
				}
				msgs[i] = e
			}
			return nil, fmt.Errorf("config %s: %s", path, strings.Join(msgs, "; "))
		}
		return nil, fmt.Errorf("config %s: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if cfg.DefaultProfile != "" {
		if _, ok := cfg.Profiles[cfg.DefaultProfile]; !ok {
			return nil, fmt.Errorf("config %s: defaultProfile %s: no such profile (it has: %s)", path, cfg.DefaultProfile, strings.Join(profileNames(&cfg), ", "))
		}
	}
	return &cfg, nil
}
