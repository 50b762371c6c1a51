package cli

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/detour-mesh/detour/identity/devca"
)

// newCACmd is `detour ca`: a development CA kept in a directory, minting SVIDs for any identity
// (so every peer in a demo or test, Istio's own HBONE code included, chains to one root).
func newCACmd() *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "A development CA that mints SPIFFE certificates"}
	var dir, td string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create a CA in --dir for --trust-domain",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return errors.New("--dir is required")
			}
			ca, err := devca.Init(dir, td)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "dev CA for trust domain %s in %s\n", ca.TrustDomain(), dir)
			return nil
		},
	}
	initCmd.Flags().StringVar(&dir, "dir", "", "directory to keep the CA in (required)")
	initCmd.Flags().StringVar(&td, "trust-domain", "cluster.local", "SPIFFE trust domain")

	var id, out string
	var ttl time.Duration
	issueCmd := &cobra.Command{
		Use:   "issue",
		Short: "Mint an SVID for --id, written as PREFIX.crt, PREFIX.key, PREFIX.bundle.pem",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || id == "" || out == "" {
				return errors.New("--dir, --id and --out are required")
			}
			if ttl <= 0 {
				return fmt.Errorf("--ttl must be positive, got %v", ttl)
			}
			ca, err := devca.Load(dir)
			if err != nil {
				return err
			}
			now := time.Now()
			svid, err := ca.Issue(id, now.Add(-time.Minute), now.Add(ttl))
			if err != nil {
				return err
			}
			if err := ca.WriteSVID(svid, out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s valid until %s: %s.crt %s.key %s.bundle.pem\n", svid.ID, svid.Certificates[0].NotAfter.Format(time.RFC3339), out, out, out)
			return nil
		},
	}
	issueCmd.Flags().StringVar(&dir, "dir", "", "CA directory from ca init (required)")
	issueCmd.Flags().StringVar(&id, "id", "", "SPIFFE ID to certify, e.g. spiffe://cluster.local/ns/default/sa/sleep (required)")
	issueCmd.Flags().StringVar(&out, "out", "", "output path prefix (required)")
	issueCmd.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "certificate lifetime")
	cmd.AddCommand(initCmd, issueCmd)
	return cmd
}
