package conformance

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// crossed is what the suite's traffic did at detour: the HTTP requests detour's pods counted
// (istio_requests_total, summed over its Running pods' metrics on 15021, reached from the host)
// per destination service of namespace ns. A pass of the suite with nothing counted here would
// mean something other than detour answered; TestMeshConformance fails on that.
func crossed(ctx context.Context, kc kubernetes.Interface, ns string) (map[string]int, error) {
	pods, err := kc.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=detour"})
	if err != nil {
		return nil, fmt.Errorf("conformance: listing detour's pods: %w", err)
	}
	total := map[string]int{}
	hc := &http.Client{Timeout: 15 * time.Second}
	for _, p := range pods.Items {
		if p.Status.Phase != corev1.PodRunning {
			continue
		}
		if err := scrape(ctx, hc, "http://"+p.Status.PodIP+":15021/metrics", ns, total); err != nil {
			return nil, err
		}
	}
	return total, nil
}

// scrape adds to total the istio_requests_total of the metrics at url whose destination
// service is in ns, by destination_service_name.
func scrape(ctx context.Context, hc *http.Client, url, ns string, total map[string]int) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("conformance: %w", err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("conformance: scraping %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("conformance: scraping %s: status %d", url, resp.StatusCode)
	}
	return requestsByService(io.LimitReader(resp.Body, 16<<20), ns, total)
}

// requestsByService adds to total the values of the istio_requests_total series in the
// Prometheus text r whose destination_service_namespace is ns, keyed by destination_service_name.
func requestsByService(r io.Reader, ns string, total map[string]int) error {
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(r)
	if err != nil {
		return fmt.Errorf("conformance: parsing detour's metrics: %w", err)
	}
	fam := families["istio_requests_total"]
	if fam == nil {
		return nil
	}
	for _, m := range fam.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["destination_service_namespace"] == ns {
			total[labels["destination_service_name"]] += int(m.GetCounter().GetValue())
		}
	}
	return nil
}

// summary is total as "a=3 b=4 (7 in all)", names sorted.
func summary(total map[string]int) string {
	names := make([]string, 0, len(total))
	sum := 0
	for n, v := range total {
		names = append(names, n)
		sum += v
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%s=%d ", n, total[n])
	}
	fmt.Fprintf(&b, "(%d in all)", sum)
	return b.String()
}
