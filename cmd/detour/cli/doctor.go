package cli

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
)

// doctorFinding is a mesh.Finding as -o json|yaml writes it.
type doctorFinding struct {
	Check string `json:"check"`
	OK    bool   `json:"ok"`
	Say   string `json:"say"`
	Fix   string `json:"fix,omitempty"`
}

func newDoctorCmd() *cobra.Command {
	var k kubeFlags
	var developer, ambientz string
	var o output
	cmd := &cobra.Command{
		Use:         "doctor -n NAMESPACE [svc/NAME]",
		Short:       "Explain, with a fix for each, why traffic would not reach detour's waypoint",
		Args:        maxArgs(1),
		Annotations: map[string]string{profileAnnotation: profileKube},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.check(); err != nil {
				return err
			}
			if k.namespace == "" {
				return errors.New("--namespace is required")
			}
			d := &mesh.Doctor{Namespace: k.namespace, Name: k.name, Developer: authz.Principal(developer), Ambientz: ambientz, Version: Version, RootNamespace: k.rootNamespace}
			if len(args) == 1 {
				name, ok := strings.CutPrefix(args[0], "svc/")
				if !ok || name == "" {
					return fmt.Errorf("%q: want svc/NAME", args[0])
				}
				d.Service = name
			}
			c, err := mesh.UserClientsContext(k.kubeconfig, k.kubeContext)
			if err != nil {
				return err
			}
			d.Kube, d.Dynamic, d.Istio = c.Kube, c.Dynamic, c.Istio
			findings, err := d.Check(cmd.Context())
			if err != nil {
				return err
			}
			bad := 0
			out := make([]doctorFinding, len(findings))
			for i, f := range findings {
				out[i] = doctorFinding(f)
				if !f.OK {
					bad++
				}
			}
			err = o.print(cmd.OutOrStdout(), out, func(w io.Writer) error {
				for _, f := range findings {
					mark := "ok  "
					if !f.OK {
						mark = "FAIL"
					}
					fmt.Fprintf(w, "%s %-9s %s\n", mark, f.Check, f.Say)
					if f.Fix != "" && !f.OK {
						fmt.Fprintf(w, "     fix:      %s\n", f.Fix)
					}
				}
				return nil
			})
			if err != nil {
				return err
			}
			if bad > 0 {
				return fmt.Errorf("%d problem(s) found", bad)
			}
			return nil
		},
	}
	k.register(cmd)
	o.register(cmd)
	cmd.Flags().StringVar(&k.rootNamespace, "root-namespace", "istio-system", "istiod's root namespace, where mesh-wide Istio config (EnvoyFilters, Telemetry, DestinationRules) is looked for")
	cmd.Flags().StringVar(&k.kubeContext, "context", "", "the kubeconfig context to use (default: its current context)")
	cmd.Flags().StringVar(&developer, "developer", "", "check that this SPIFFE ID may steal from the service")
	cmd.Flags().StringVar(&ambientz, "istiod", "", "istiod's /debug/ambientz URL, to check what ztunnel is told")
	return cmd
}
