// Command ratio reads `go test -bench` output on stdin and prints the median of each metric and
// the ratios BENCHMARKS.md tracks, as a Markdown table.
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// A ratio compares one benchmark's metric with another's; higher is better for detour.
type ratio struct {
	what, num, den, unit string
	invert               bool // lower is better: report den/num
	bar                  string
}

var ratios = []ratio{
	{"one HBONE stream vs one plain Go TLS 1.3 stream (throughput)", "Bulk/hbone", "Bulk/tls", "MB/s", false, ">= 0.9"},
	{"detour server vs Istio's Go server, forwarding one bulk stream", "Bulk/detour-forward", "Bulk/istio-forward", "MB/s", false, ">= 1.0"},
	{"detour server vs Istio's Go server, new stream per 1 KiB echo (req/s)", "Connect/detour", "Connect/istio", "req/s", false, ">= 1.0"},
	{"detour vs Istio p50 latency of that echo (Istio / detour)", "Connect/detour", "Connect/istio", "p50-µs", true, ""},
	{"detour vs Istio p99 latency of that echo (Istio / detour)", "Connect/detour", "Connect/istio", "p99-µs", true, ""},
	{"memory per idle stream, detour vs Istio (Istio / detour)", "IdleStreams/detour", "IdleStreams/istio", "B/idle-stream", true, ""},
	{"waypoint hop vs direct HBONE hop (throughput)", "WaypointBulk/waypoint", "WaypointBulk/direct", "MB/s", false, ">= 0.75"},
}

// diffs are latencies a waypoint adds: num - den, in the metric's unit.
var diffs = []ratio{
	{"p50 added by the waypoint hop (µs)", "WaypointConnect/waypoint", "WaypointConnect/direct", "p50-µs", false, "<= 100"},
	{"p99 added by the waypoint hop (µs)", "WaypointConnect/waypoint", "WaypointConnect/direct", "p99-µs", false, "<= 500"},
}

var line = regexp.MustCompile(`^Benchmark(\S+?)(-\d+)?\s+\d+\s+(.*)$`)

func main() {
	vals := map[string]map[string][]float64{}
	var order []string
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		name := m[1]
		if vals[name] == nil {
			vals[name] = map[string][]float64{}
			order = append(order, name)
		}
		f := strings.Fields(m[3])
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err == nil {
				vals[name][f[i+1]] = append(vals[name][f[i+1]], v)
			}
		}
	}
	med := func(name, unit string) (float64, bool) {
		v := slices.Clone(vals[name][unit])
		if len(v) == 0 {
			return 0, false
		}
		slices.Sort(v)
		return v[len(v)/2], true
	}
	fmt.Println("| benchmark | metric | median | runs |")
	fmt.Println("|---|---|---|---|")
	for _, name := range order {
		units := make([]string, 0, len(vals[name]))
		for u := range vals[name] {
			units = append(units, u)
		}
		slices.Sort(units)
		for _, u := range units {
			m, _ := med(name, u)
			fmt.Printf("| %s | %s | %.4g | %d |\n", name, u, m, len(vals[name][u]))
		}
	}
	fmt.Println()
	fmt.Println("| ratio | value | bar |")
	fmt.Println("|---|---|---|")
	for _, r := range ratios {
		a, ok1 := med(r.num, r.unit)
		b, ok2 := med(r.den, r.unit)
		if !ok1 || !ok2 || a == 0 || b == 0 {
			continue
		}
		v := a / b
		if r.invert {
			v = b / a
		}
		fmt.Printf("| %s | %.2fx | %s |\n", r.what, v, r.bar)
	}
	for _, r := range diffs {
		a, ok1 := med(r.num, r.unit)
		b, ok2 := med(r.den, r.unit)
		if ok1 && ok2 {
			fmt.Printf("| %s | %+.0f | %s |\n", r.what, a-b, r.bar)
		}
	}
}
