package cli

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/mesh"
	"github.com/detour-mesh/detour/proxy/authz"
)

func newDoctorCmd() *cobra.Command {
	var k kubeFlags
	var developer, ambientz string
	cmd := &cobra.Command{
		Use:   "doctor -n NAMESPACE [svc/NAME]",
		Short: "Explain, with a fix for each, why traffic would not reach detour's waypoint",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if k.namespace == "" {
				return errors.New("--namespace is required")
			}
			d := &mesh.Doctor{Namespace: k.namespace, Name: k.name, Developer: authz.Principal(developer), Ambientz: ambientz, Version: Version}
			if len(args) == 1 {
				name, ok := strings.CutPrefix(args[0], "svc/")
				if !ok || name == "" {
					return fmt.Errorf("%q: want svc/NAME", args[0])
				}
				d.Service = name
			}
			c, err := mesh.UserClients(k.kubeconfig)
			if err != nil {
				return err
			}
			d.Kube, d.Dynamic, d.Istio = c.Kube, c.Dynamic, c.Istio
			findings, err := d.Check(cmd.Context())
			if err != nil {
				return err
			}
			bad := 0
			for _, f := range findings {
				mark := "ok  "
				if !f.OK {
					mark, bad = "FAIL", bad+1
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s %-9s %s\n", mark, f.Check, f.Say)
				if f.Fix != "" && !f.OK {
					fmt.Fprintf(cmd.OutOrStdout(), "     fix:      %s\n", f.Fix)
				}
			}
			if bad > 0 {
				return fmt.Errorf("%d problem(s) found", bad)
			}
			return nil
		},
	}
	k.register(cmd)
	cmd.Flags().StringVar(&developer, "developer", "", "check that this SPIFFE ID may steal from the service")
	cmd.Flags().StringVar(&ambientz, "istiod", "", "istiod's /debug/ambientz URL, to check what ztunnel is told")
	return cmd
}
