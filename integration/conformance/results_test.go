package conformance

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	confv1 "sigs.k8s.io/gateway-api/conformance/apis/v1"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/yaml"
)

// results collects each conformance test's outcome from the suite's Hook (called as each test
// ends) for the table written beside the suite's own report.
type results struct {
	mu      sync.Mutex
	started time.Time // when the previous test ended, or Run began
	rows    []result
}

type result struct {
	name, outcome string
	took          time.Duration
}

// record is the suite's Hook: t is the ended test's own *testing.T.
func (r *results) record(t *testing.T, test suite.ConformanceTest, _ *suite.ConformanceTestSuite) {
	outcome := "pass"
	switch {
	case t.Failed():
		outcome = "FAIL"
	case t.Skipped():
		outcome = "skip"
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	r.rows = append(r.rows, result{name: test.ShortName, outcome: outcome, took: now.Sub(r.started)})
	r.started = now
}

// table is a Markdown table of the outcomes, with a count line.
func (r *results) table() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	count := map[string]int{}
	b.WriteString("| test | result | seconds |\n|---|---|---|\n")
	for _, row := range r.rows {
		count[row.outcome]++
		fmt.Fprintf(&b, "| %s | %s | %.1f |\n", row.name, row.outcome, row.took.Seconds())
	}
	fmt.Fprintf(&b, "\n%d passed, %d failed, %d skipped\n", count["pass"], count["FAIL"], count["skip"])
	return b.String()
}

// write logs the table and writes it (results.md) and the suite's report (report.yaml) to dir.
func (r *results) write(dir string, report *confv1.ConformanceReport, logf func(string, ...any)) error {
	table := r.table()
	logf("conformance: results\n%s", table)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("conformance: %w", err)
	}
	b, err := yaml.Marshal(report)
	if err != nil {
		return fmt.Errorf("conformance: %w", err)
	}
	header := fmt.Sprintf("Gateway API mesh conformance (sigs.k8s.io/gateway-api/conformance) with detour as the waypoint, %s\n\n", time.Now().UTC().Format(time.RFC3339))
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(header+table), 0o644); err != nil {
		return fmt.Errorf("conformance: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "report.yaml"), b, 0o644); err != nil {
		return fmt.Errorf("conformance: %w", err)
	}
	return nil
}
