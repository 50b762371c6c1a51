package mesh

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/encoding/protojson"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"sigs.k8s.io/yaml"
)

// MeshConfigMap is istiod's mesh config ConfigMap (default revision; a revisioned istiod reads
// istio-<revision>) in the root namespace, and MeshConfigKey its key (YAML MeshConfig).
const (
	MeshConfigMap = "istio"
	MeshConfigKey = "mesh"
)

// meshConfigFactory is an informer factory watching the mesh config ConfigMap alone, or nil
// when nobody wants it or it cannot be read (forbidden: logged, and CUSTOM policies deny what
// they match, as with no provider; without this check the informer would retry forever and
// discovery never sync).
func (d *Discovery) meshConfigFactory(ctx context.Context) informers.SharedInformerFactory {
	if d.MeshConfig == nil {
		return nil
	}
	ns := d.rootNamespace()
	_, err := d.Kube.CoreV1().ConfigMaps(ns).Get(ctx, MeshConfigMap, metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		d.log().Warn("mesh: not watching the mesh config: CUSTOM policies deny what they match", "configmap", ns+"/"+MeshConfigMap, "err", err)
		return nil
	}
	sel := fields.OneTermEqualSelector("metadata.name", MeshConfigMap).String()
	return informers.NewSharedInformerFactoryWithOptions(d.Kube, 0, informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = sel }))
}

func (d *Discovery) rootNamespace() string {
	if d.Waypoint.RootNamespace != "" {
		return d.Waypoint.RootNamespace
	}
	return "istio-system"
}

// updateMeshConfig hands the ConfigMap's mesh config to d.MeshConfig when it changed; an absent
// ConfigMap is an empty config, one that does not parse keeps the last (as istiod).
func (d *Discovery) updateMeshConfig(get func() (*corev1.ConfigMap, error)) {
	if get == nil {
		return
	}
	cm, err := get()
	var data string
	if err == nil {
		data = cm.Data[MeshConfigKey]
	} else if !apierrors.IsNotFound(err) {
		d.log().Error("mesh: mesh config not updated", "err", err)
		return
	}
	if d.meshSeen && data == d.meshData {
		return
	}
	mc, err := ParseMeshConfig(data)
	if err != nil {
		d.log().Error("mesh: mesh config not updated", "configmap", d.rootNamespace()+"/"+MeshConfigMap, "err", err)
		return
	}
	d.meshSeen, d.meshData = true, data
	d.MeshConfig(mc)
}

// ParseMeshConfig reads a MeshConfig written as YAML. Fields this build of istio.io/api does
// not know are skipped: the document is istiod's, written for its version.
func ParseMeshConfig(y string) (*meshv1alpha1.MeshConfig, error) {
	mc := &meshv1alpha1.MeshConfig{}
	j, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		return nil, fmt.Errorf("mesh: parsing the mesh config: %w", err)
	}
	if string(j) == "null" {
		return mc, nil
	}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(j, mc); err != nil {
		return nil, fmt.Errorf("mesh: parsing the mesh config: %w", err)
	}
	return mc, nil
}
