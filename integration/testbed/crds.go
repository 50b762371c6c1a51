package testbed

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// crdFiles lists the CRD manifests istiod needs: the Gateway API standard channel from the
// gateway-api module and Istio's own from the istio module, at the versions Istio builds with.
func crdFiles(ctx context.Context) ([]string, error) {
	gw, err := ModuleDir(ctx, "sigs.k8s.io/gateway-api@"+GatewayAPIVersion)
	if err != nil {
		return nil, err
	}
	files, err := filepath.Glob(filepath.Join(gw, "config", "crd", "standard", "*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("testbed: no Gateway API CRDs under %s", gw)
	}
	istio, err := ModuleDir(ctx, "istio.io/istio@"+IstioVersion)
	if err != nil {
		return nil, err
	}
	return append(files, filepath.Join(istio, "manifests", "charts", "base", "files", "crd-all.gen.yaml")), nil
}

// applyCRDs creates every CustomResourceDefinition in the CRD files and waits until each is
// established. Other kinds in those files (admission policies) are skipped.
func (c *Cluster) applyCRDs(ctx context.Context) error {
	files, err := crdFiles(ctx)
	if err != nil {
		return err
	}
	cs, err := apiext.NewForConfig(c.REST)
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	var names []string
	for _, file := range files {
		crds, err := readCRDs(file)
		if err != nil {
			return err
		}
		for _, crd := range crds {
			_, err := cs.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, crd, metav1.CreateOptions{})
			if err != nil && !apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("testbed: creating CRD %s: %w", crd.Name, err)
			}
			names = append(names, crd.Name)
		}
	}
	for _, name := range names {
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
			crd, err := cs.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			for _, cond := range crd.Status.Conditions {
				if cond.Type == apiextv1.Established && cond.Status == apiextv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("testbed: CRD %s not established: %w", name, err)
		}
	}
	return nil
}

func readCRDs(file string) ([]*apiextv1.CustomResourceDefinition, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	var out []*apiextv1.CustomResourceDefinition
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("testbed: reading %s: %w", file, err)
		}
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return nil, fmt.Errorf("testbed: reading %s: %w", file, err)
		}
		if meta.Kind != "CustomResourceDefinition" {
			continue
		}
		crd := &apiextv1.CustomResourceDefinition{}
		if err := yaml.Unmarshal(doc, crd); err != nil {
			return nil, fmt.Errorf("testbed: decoding a CRD in %s: %w", file, err)
		}
		out = append(out, crd)
	}
}
