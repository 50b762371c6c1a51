package mesh

import (
	"fmt"
	"math"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
)

// envInput is everything the kubelet reads to make a container's environment, fetched
// beforehand, so that the rules (environment) are a function without I/O.
type envInput struct {
	pod       *corev1.Pod
	container *corev1.Container
	// services are the candidates for service links: the pod's namespace's and the kubernetes
	// Service of default (either may hold more; environment picks as the kubelet does).
	services []corev1.Service
	// started is when the container started: a service created after it is not in its
	// environment (the kubelet computed it then). Zero: no such filter.
	started    time.Time
	configMaps map[string]*corev1.ConfigMap // the referenced ones that exist, by name
	secrets    map[string]*corev1.Secret
	// allocatable is the node's, the default of a limit the containers do not set.
	allocatable corev1.ResourceList
}

// environment is the container's environment as the kubelet makes it
// (k8s.io/kubernetes v1.37 pkg/kubelet/kubelet_pods.go makeEnvironmentVariables): envFrom first
// (later sources win, with their prefix), then env in order (a value's $(VAR) references expanded
// against the variables so far and the service links; else its valueFrom resolved), then the
// service links not already set. An optional reference to a missing ConfigMap, Secret or key
// leaves its variable as it was; a required one is an error. unset lists the variables the
// kubelet reads inside the pod (fileKeyRef), which cannot be read from outside it.
func (in envInput) environment() (vars map[string]string, unset []string, err error) {
	links := in.serviceLinks()
	vars = map[string]string{}
	for _, from := range in.container.EnvFrom {
		data, err := in.envFromData(from)
		if err != nil {
			return nil, nil, err
		}
		for k, v := range data {
			vars[from.Prefix+k] = v
		}
	}
	lookup := func(name string) (string, bool) {
		if v, ok := vars[name]; ok {
			return v, true
		}
		v, ok := links[name]
		return v, ok
	}
	for _, e := range in.container.Env {
		v, set, err := in.value(e, lookup)
		if err != nil {
			return nil, nil, err
		}
		switch {
		case set:
			vars[e.Name] = v
		case e.ValueFrom != nil && e.ValueFrom.FileKeyRef != nil:
			f := e.ValueFrom.FileKeyRef
			unset = append(unset, fmt.Sprintf("%s (fileKeyRef: key %s of %s in volume %s, read inside the pod)", e.Name, f.Key, f.Path, f.VolumeName))
		}
	}
	for k, v := range links {
		if _, ok := vars[k]; !ok {
			vars[k] = v
		}
	}
	return vars, unset, nil
}

// envFromData is one envFrom source's variables before its prefix; nil for a missing optional one.
func (in envInput) envFromData(from corev1.EnvFromSource) (map[string]string, error) {
	switch {
	case from.ConfigMapRef != nil:
		cm, ok := in.configMaps[from.ConfigMapRef.Name]
		if !ok {
			if optional(from.ConfigMapRef.Optional) {
				return nil, nil
			}
			return nil, in.missing("ConfigMap", from.ConfigMapRef.Name, "envFrom")
		}
		return cm.Data, nil
	case from.SecretRef != nil:
		s, ok := in.secrets[from.SecretRef.Name]
		if !ok {
			if optional(from.SecretRef.Optional) {
				return nil, nil
			}
			return nil, in.missing("Secret", from.SecretRef.Name, "envFrom")
		}
		data := make(map[string]string, len(s.Data))
		for k, v := range s.Data {
			data[k] = string(v)
		}
		return data, nil
	}
	return nil, nil
}

// value is env var e's value; set is false when the kubelet leaves it as it was (an optional
// reference to what is missing) or cannot be followed from outside the pod (fileKeyRef).
func (in envInput) value(e corev1.EnvVar, lookup func(string) (string, bool)) (v string, set bool, err error) {
	src := e.ValueFrom
	switch {
	case e.Value != "":
		return expand(e.Value, lookup), true, nil
	case src == nil:
		return "", true, nil
	case src.FieldRef != nil:
		v, err := in.field(src.FieldRef)
		if err != nil {
			return "", false, fmt.Errorf("mesh: env %s of pod %s: %w", e.Name, in.pod.Name, err)
		}
		return v, true, nil
	case src.ResourceFieldRef != nil:
		v, err := in.resourceField(src.ResourceFieldRef)
		if err != nil {
			return "", false, fmt.Errorf("mesh: env %s of pod %s: %w", e.Name, in.pod.Name, err)
		}
		return v, true, nil
	case src.ConfigMapKeyRef != nil:
		ref := src.ConfigMapKeyRef
		cm, ok := in.configMaps[ref.Name]
		if !ok {
			if optional(ref.Optional) {
				return "", false, nil
			}
			return "", false, in.missing("ConfigMap", ref.Name, "env "+e.Name)
		}
		if v, ok := cm.Data[ref.Key]; ok {
			return v, true, nil
		}
		if optional(ref.Optional) {
			return "", false, nil
		}
		return "", false, in.missingKey("ConfigMap", ref.Name, ref.Key, e.Name)
	case src.SecretKeyRef != nil:
		ref := src.SecretKeyRef
		s, ok := in.secrets[ref.Name]
		if !ok {
			if optional(ref.Optional) {
				return "", false, nil
			}
			return "", false, in.missing("Secret", ref.Name, "env "+e.Name)
		}
		if v, ok := s.Data[ref.Key]; ok {
			return string(v), true, nil
		}
		if optional(ref.Optional) {
			return "", false, nil
		}
		return "", false, in.missingKey("Secret", ref.Name, ref.Key, e.Name)
	}
	if src.FileKeyRef != nil {
		return "", false, nil // the pod's own volume
	}
	return "", true, nil // a source the kubelet does not know: "", as it sets it
}

func (in envInput) missing(kind, name, what string) error {
	return fmt.Errorf("mesh: the target's environment (%s of container %s) needs %s %s/%s, which does not exist (deleted since pod %s started?); the pod would not start again without it",
		what, in.container.Name, kind, in.pod.Namespace, name, in.pod.Name)
}

func (in envInput) missingKey(kind, name, key, env string) error {
	return fmt.Errorf("mesh: the target's environment (env %s of container %s) needs key %s of %s %s/%s, which has no such key (removed since pod %s started?); the pod would not start again without it",
		env, in.container.Name, key, kind, in.pod.Namespace, name, in.pod.Name)
}

// field is a fieldRef's value (kubelet_pods.go podFieldSelectorRuntimeValue,
// pkg/apis/core/pods/helpers.go ConvertDownwardAPIFieldLabel, pkg/fieldpath/fieldpath.go
// ExtractFieldPathAsString). The pod's IPs and its node's, as the kubelet wrote them in the
// pod's status, in the node's IP family order.
func (in envInput) field(fs *corev1.ObjectFieldSelector) (string, error) {
	if fs.APIVersion != "" && fs.APIVersion != "v1" {
		return "", fmt.Errorf("unsupported pod version: %s", fs.APIVersion)
	}
	p := in.pod
	path := fs.FieldPath
	if base, key, ok := splitSubscript(path); ok {
		switch base {
		case "metadata.annotations":
			if errs := validation.IsQualifiedName(strings.ToLower(key)); len(errs) != 0 {
				return "", fmt.Errorf("invalid key subscript in %s: %s", path, strings.Join(errs, ";"))
			}
			return p.Annotations[key], nil
		case "metadata.labels":
			if errs := validation.IsQualifiedName(key); len(errs) != 0 {
				return "", fmt.Errorf("invalid key subscript in %s: %s", path, strings.Join(errs, ";"))
			}
			return p.Labels[key], nil
		}
		return "", fmt.Errorf("field label does not support subscript: %s", path)
	}
	podIPs := make([]string, 0, len(p.Status.PodIPs))
	for _, ip := range p.Status.PodIPs {
		podIPs = append(podIPs, ip.IP)
	}
	hostIPs := make([]string, 0, len(p.Status.HostIPs))
	for _, ip := range p.Status.HostIPs {
		hostIPs = append(hostIPs, ip.IP)
	}
	if len(hostIPs) == 0 && p.Status.HostIP != "" {
		hostIPs = []string{p.Status.HostIP}
	}
	switch path {
	case "spec.nodeName", "spec.host": // spec.host: old clients' name for it
		return p.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return p.Spec.ServiceAccountName, nil
	case "status.hostIP":
		if len(hostIPs) == 0 {
			return "", fmt.Errorf("pod %s has no host IP in its status", p.Name)
		}
		return hostIPs[0], nil
	case "status.hostIPs":
		return strings.Join(hostIPs, ","), nil
	case "status.podIP":
		if len(podIPs) > 0 {
			return podIPs[0], nil
		}
		return p.Status.PodIP, nil
	case "status.podIPs":
		return strings.Join(podIPs, ","), nil
	case "metadata.annotations":
		return formatMap(p.Annotations), nil
	case "metadata.labels":
		return formatMap(p.Labels), nil
	case "metadata.name":
		return p.Name, nil
	case "metadata.namespace":
		return p.Namespace, nil
	case "metadata.uid":
		return string(p.UID), nil
	case "spec.restartPolicy", "spec.schedulerName", "status.phase": // valid labels the kubelet cannot extract
		return "", fmt.Errorf("unsupported fieldPath: %v", path)
	}
	return "", fmt.Errorf("field label not supported: %s", path)
}

// splitSubscript splits "metadata.labels['k']" into "metadata.labels" and "k"
// (fieldpath.SplitMaybeSubscriptedPath).
func splitSubscript(path string) (base, key string, ok bool) {
	s, found := strings.CutSuffix(path, "']")
	if !found {
		return path, "", false
	}
	base, key, found = strings.Cut(s, "['")
	if !found || base == "" {
		return path, "", false
	}
	return base, key, true
}

// formatMap is fieldpath.FormatMap: key="value" lines, sorted, values Go-quoted.
func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b []byte
	for _, k := range keys {
		if len(b) > 0 {
			b = append(b, '\n')
		}
		b = append(append(b, k...), '=')
		b = strconv.AppendQuote(b, m[k])
	}
	return string(b)
}

// resourceField is a resourceFieldRef's value: the container's (or the named container's)
// request or limit in divisor units, rounded up, a limit it does not set defaulting to the pod's
// pod-level limit (cpu, memory), else the node's allocatable (kubelet_resources.go
// defaultPodLimitsForDownwardAPI, pkg/api/v1/resource/helpers.go ExtractContainerResourceValue
// and MergeContainerResourceLimits).
func (in envInput) resourceField(fs *corev1.ResourceFieldSelector) (string, error) {
	c := in.container
	if fs.ContainerName != "" {
		if c = findContainer(in.pod, fs.ContainerName); c == nil {
			return "", fmt.Errorf("container %s not found", fs.ContainerName)
		}
	}
	limits := in.defaultedLimits(c)
	if fs.ContainerName != "" && !isAppContainer(in.pod, fs.ContainerName) {
		limits = c.Resources.Limits // the kubelet defaults the pod's app containers only
	}
	divisor := resource.MustParse("1")
	if !fs.Divisor.IsZero() {
		divisor = fs.Divisor
	}
	ceil := func(q resource.Quantity, milli bool) string {
		if milli {
			return strconv.FormatInt(int64(math.Ceil(float64(q.MilliValue())/float64(divisor.MilliValue()))), 10)
		}
		return strconv.FormatInt(int64(math.Ceil(float64(q.Value())/float64(divisor.Value()))), 10)
	}
	kind, name, _ := strings.Cut(fs.Resource, ".")
	list := c.Resources.Requests
	switch kind {
	case "limits":
		list = limits
	case "requests":
	default:
		return "", fmt.Errorf("unsupported container resource : %v", fs.Resource)
	}
	switch rn := corev1.ResourceName(name); {
	case rn == corev1.ResourceCPU:
		return ceil(list[rn], true), nil
	case rn == corev1.ResourceMemory, rn == corev1.ResourceEphemeralStorage, strings.HasPrefix(name, corev1.ResourceHugePagesPrefix):
		return ceil(list[rn], false), nil
	}
	return "", fmt.Errorf("unsupported container resource : %v", fs.Resource)
}

// defaultedLimits are c's limits with those it does not set (or sets to zero) taken from the
// pod-level limits, else the node's allocatable: cpu, memory and ephemeral-storage.
func (in envInput) defaultedLimits(c *corev1.Container) corev1.ResourceList {
	alloc := corev1.ResourceList{}
	for k, v := range in.allocatable {
		alloc[k] = v
	}
	if r := in.pod.Spec.Resources; r != nil {
		for _, rn := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} { // the pod-level resources the downward API takes
			if v, ok := r.Limits[rn]; ok && !v.IsZero() {
				if _, ok := alloc[rn]; ok {
					alloc[rn] = v
				}
			}
		}
	}
	out := corev1.ResourceList{}
	for k, v := range c.Resources.Limits {
		out[k] = v
	}
	for _, rn := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory, corev1.ResourceEphemeralStorage} {
		if q, ok := out[rn]; !ok || q.IsZero() {
			if v, ok := alloc[rn]; ok {
				out[rn] = v
			}
		}
	}
	return out
}

// needsAllocatable tells whether a resourceFieldRef of c reads a limit that the container does
// not set, whose value is then the node's allocatable.
func needsAllocatable(pod *corev1.Pod, c *corev1.Container) bool {
	for _, e := range c.Env {
		if e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil || e.Value != "" {
			continue
		}
		fs := e.ValueFrom.ResourceFieldRef
		kind, name, _ := strings.Cut(fs.Resource, ".")
		target := c
		if fs.ContainerName != "" {
			target = findContainer(pod, fs.ContainerName)
		}
		if kind != "limits" || target == nil {
			continue
		}
		if q, ok := target.Resources.Limits[corev1.ResourceName(name)]; !ok || q.IsZero() {
			return true
		}
	}
	return false
}

func isAppContainer(pod *corev1.Pod, name string) bool {
	for _, c := range pod.Spec.Containers {
		if c.Name == name {
			return true
		}
	}
	return false
}

// findContainer is the pod's container or init container name (resource.findContainerInPod).
func findContainer(pod *corev1.Pod, name string) *corev1.Container {
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	return nil
}

// serviceLinks are the service environment variables (kubelet_pods.go getServiceEnvVarMap,
// pkg/kubelet/envvars FromServices): default's kubernetes Service always, every Service of the
// pod's namespace with enableServiceLinks (on unless the pod says false; a namespace's own
// "kubernetes" wins over default's), those with a cluster IP only.
func (in envInput) serviceLinks() map[string]string {
	links := in.pod.Spec.EnableServiceLinks == nil || *in.pod.Spec.EnableServiceLinks
	picked := map[string]*corev1.Service{}
	for i := range in.services {
		s := &in.services[i]
		if s.Spec.ClusterIP == "" || s.Spec.ClusterIP == corev1.ClusterIPNone {
			continue
		}
		if !in.started.IsZero() && s.CreationTimestamp.After(in.started) {
			continue // created after the container started: not in its environment
		}
		switch {
		case s.Namespace == "default" && s.Name == "kubernetes":
			if _, ok := picked[s.Name]; !ok {
				picked[s.Name] = s
			}
		case s.Namespace == in.pod.Namespace && links:
			picked[s.Name] = s
		}
	}
	m := map[string]string{}
	for _, s := range picked {
		serviceVars(s, m)
	}
	return m
}

// serviceVars adds s's variables to m (envvars.FromServices and makeLinkVariables): NAME_SERVICE_HOST,
// NAME_SERVICE_PORT (the first port) and NAME_SERVICE_PORT_PORTNAME, and Docker's link
// variables NAME_PORT, NAME_PORT_P_PROTO{,_PROTO,_PORT,_ADDR}.
func serviceVars(s *corev1.Service, m map[string]string) {
	if len(s.Spec.Ports) == 0 {
		return
	}
	prefix := strings.ToUpper(strings.ReplaceAll(s.Name, "-", "_"))
	m[prefix+"_SERVICE_HOST"] = s.Spec.ClusterIP
	m[prefix+"_SERVICE_PORT"] = strconv.Itoa(int(s.Spec.Ports[0].Port))
	for _, p := range s.Spec.Ports {
		if p.Name != "" {
			m[prefix+"_SERVICE_PORT_"+strings.ToUpper(strings.ReplaceAll(p.Name, "-", "_"))] = strconv.Itoa(int(p.Port))
		}
	}
	for i, p := range s.Spec.Ports {
		proto := string(corev1.ProtocolTCP)
		if p.Protocol != "" {
			proto = string(p.Protocol)
		}
		url := strings.ToLower(proto) + "://" + net.JoinHostPort(s.Spec.ClusterIP, strconv.Itoa(int(p.Port)))
		if i == 0 {
			m[prefix+"_PORT"] = url
		}
		pp := fmt.Sprintf("%s_PORT_%d_%s", prefix, p.Port, strings.ToUpper(proto))
		m[pp] = url
		m[pp+"_PROTO"] = strings.ToLower(proto)
		m[pp+"_PORT"] = strconv.Itoa(int(p.Port))
		m[pp+"_ADDR"] = s.Spec.ClusterIP
	}
}

func optional(b *bool) bool { return b != nil && *b }
