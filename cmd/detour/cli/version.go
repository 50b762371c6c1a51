package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"
)

// Version is set at build time (make build, make release) with
// -ldflags "-X github.com/detour-mesh/detour/cmd/detour/cli.Version=...". Empty: the version is
// read from the binary's build info (a go install or go build of a module or a checkout).
var Version string

// versionInfo is what `detour version` says.
type versionInfo struct {
	Version   string `json:"version" yaml:"version"`
	Revision  string `json:"revision,omitempty" yaml:"revision,omitempty"` // the VCS commit, when built from a checkout
	Modified  bool   `json:"modified,omitempty" yaml:"modified,omitempty"` // the checkout had local changes
	GoVersion string `json:"goVersion" yaml:"goVersion"`
	Platform  string `json:"platform" yaml:"platform"` // GOOS/GOARCH
}

// buildVersion is the version stamped at link time, else the module version of the build info
// (go install ...@v1.2.3), else the VCS revision (go build in a checkout: devel-REV[-dirty]),
// else "dev".
func buildVersion(stamped string, info *debug.BuildInfo) versionInfo {
	v := versionInfo{Version: stamped, GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if info != nil {
		v.GoVersion = info.GoVersion
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				v.Revision = s.Value
			case "vcs.modified":
				v.Modified = s.Value == "true"
			}
		}
	}
	switch {
	case v.Version != "":
	case info != nil && info.Main.Version != "" && info.Main.Version != "(devel)":
		v.Version = info.Main.Version
	case v.Revision != "":
		v.Version = "devel-" + v.Revision[:min(12, len(v.Revision))]
		if v.Modified {
			v.Version += "-dirty"
		}
	default:
		v.Version = "dev"
	}
	return v
}

// currentVersion is this binary's version.
func currentVersion() versionInfo {
	info, _ := debug.ReadBuildInfo()
	return buildVersion(Version, info)
}

func newVersionCmd() *cobra.Command {
	var o output
	cmd := &cobra.Command{
		Use:   "version [-o json|yaml]",
		Short: "Print detour's version (also: detour --version)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := currentVersion()
			return o.print(cmd.OutOrStdout(), v, func(w io.Writer) error {
				_, err := fmt.Fprintln(w, "detour", v.Version)
				return err
			})
		},
	}
	o.register(cmd)
	return cmd
}

// output is a command's -o flag: text (the default), json or yaml.
type output struct{ format string }

func (o *output) register(cmd *cobra.Command) {
	cmd.Flags().StringVarP(&o.format, "output", "o", "", "output format: json or yaml (default: text for people)")
}

// check refuses an unknown format before anything else runs.
func (o *output) check() error {
	switch o.format {
	case "", "text", "json", "yaml":
		return nil
	}
	return fmt.Errorf("--output %q: want json or yaml", o.format)
}

// print writes v as JSON or YAML, or calls text for people.
func (o *output) print(w io.Writer, v any, text func(io.Writer) error) error {
	if err := o.check(); err != nil {
		return err
	}
	switch o.format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "yaml":
		// Through JSON, so the field names are the JSON ones.
		j, err := json.Marshal(v)
		if err != nil {
			return err
		}
		var doc any
		if err := yaml.Unmarshal(j, &doc); err != nil {
			return err
		}
		enc := yaml.NewEncoder(w)
		enc.SetIndent(2)
		if err := enc.Encode(doc); err != nil {
			return err
		}
		return enc.Close()
	}
	return text(w)
}
