package mesh

import (
	"context"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// checkInstall adds what the install depends on: the APIs are served, and, once detour is
// installed (its Deployment exists; the gateway check names a missing install), its CRD is, the
// waypoint's pods can pull their image, and the waypoint runs the CLI's version.
func (d *Doctor) checkInstall(ctx context.Context, add func(Finding)) {
	dep, err := d.Kube.AppsV1().Deployments(d.Namespace).Get(ctx, d.name(), metav1.GetOptions{})
	installed := err == nil
	d.checkCRDs(installed, add)
	if err != nil {
		if !apierrors.IsNotFound(err) {
			add(Finding{Check: "deployment", Say: fmt.Sprintf("cannot read Deployment %s/%s: %v", d.Namespace, d.name(), err)})
		}
		return
	}
	d.checkImage(ctx, add)
	d.checkVersion(dep.Labels[VersionLabel], containerImage(dep.Spec.Template.Spec.Containers), add)
}

func (d *Doctor) checkCRDs(installed bool, add func(Finding)) {
	var missing []string
	fix := ""
	apis := []struct{ gv, resource, fix string }{
		{"gateway.networking.k8s.io/v1", "gateways", GatewayAPIInstall},
		{"security.istio.io/v1", "authorizationpolicies", IstioAmbientInstall},
	}
	if installed {
		apis = append(apis, struct{ gv, resource, fix string }{"detour.dev/v1alpha1", "debugsessions", "detour install -n " + d.Namespace + " (it creates the CRD)"})
	}
	for _, api := range apis {
		list, err := d.Kube.Discovery().ServerResourcesForGroupVersion(api.gv)
		if err == nil && slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == api.resource }) {
			continue
		}
		if err != nil && !apierrors.IsNotFound(err) {
			add(Finding{Check: "crds", Say: fmt.Sprintf("cannot read whether %s is served: %v", api.gv, err)})
			return
		}
		missing = append(missing, api.resource+"."+strings.Split(api.gv, "/")[0])
		if fix == "" {
			fix = api.fix
		}
	}
	if len(missing) > 0 {
		add(Finding{Check: "crds", Say: "the cluster does not serve " + strings.Join(missing, ", ") + " (CRDs not installed)", Fix: fix})
		return
	}
	add(Finding{Check: "crds", OK: true, Say: "the Gateway API and Istio CRDs are installed"})
}

// checkImage: no waypoint pod is stuck pulling its image.
func (d *Doctor) checkImage(ctx context.Context, add func(Finding)) {
	pods, err := d.Kube.CoreV1().Pods(d.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=" + d.name()})
	if err != nil {
		add(Finding{Check: "image", Say: "cannot list the waypoint's pods: " + err.Error()})
		return
	}
	if bad := imagePullFailures(pods.Items); len(bad) > 0 {
		add(Finding{Check: "image", Say: strings.Join(bad, "; "),
			Fix: fmt.Sprintf("detour install -n %s --image REF with an image the nodes can pull (releases: %s:VERSION; a private registry needs imagePullSecrets on ServiceAccount %s)",
				d.Namespace, ImageRepository, d.name())})
		return
	}
	add(Finding{Check: "image", OK: true, Say: fmt.Sprintf("%d waypoint pod(s), none failing to pull its image", len(pods.Items))})
}

// pullReasons are the kubelet's reasons for a container waiting on its image
// (kubernetes pkg/kubelet/images/types.go).
var pullReasons = []string{"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}

// imagePullFailures describes, one string per container, the pods' containers waiting on an
// image they cannot pull.
func imagePullFailures(pods []corev1.Pod) []string {
	var out []string
	for _, p := range pods {
		for _, c := range slices.Concat(p.Status.InitContainerStatuses, p.Status.ContainerStatuses) {
			if w := c.State.Waiting; w != nil && slices.Contains(pullReasons, w.Reason) {
				out = append(out, fmt.Sprintf("pod %s cannot pull image %s: %s %s", p.Name, c.Image, w.Reason, w.Message))
			}
		}
	}
	return out
}

func containerImage(cs []corev1.Container) string {
	for _, c := range cs {
		if c.Name == "detour" {
			return c.Image
		}
	}
	return ""
}

// checkVersion: the waypoint runs the CLI's version. The version is the image's tag when the
// image is a release image, else the VersionLabel the installing CLI wrote.
func (d *Doctor) checkVersion(label, image string, add func(Finding)) {
	if d.Version == "" {
		return
	}
	running, from := label, "installed by detour "+label
	if tag, ok := strings.CutPrefix(image, ImageRepository+":"); ok {
		running, from = tag, "image "+image
	}
	switch {
	case running == "":
		add(Finding{Check: "version", OK: true, Say: "the waypoint's version is unknown (image " + image + ", no " + VersionLabel + " label)"})
	case running == d.Version:
		add(Finding{Check: "version", OK: true, Say: "the waypoint runs detour " + running + ", the CLI's version"})
	default:
		fix := "detour install -n " + d.Namespace + " with this CLI (upgrades the waypoint to " + d.Version + "), or use the CLI of " + running
		if ReleaseImage(d.Version) == "" {
			fix = "this CLI is a development build (" + d.Version + "): detour install -n " + d.Namespace + " --image REF, or use the CLI of " + running
		}
		add(Finding{Check: "version", Say: fmt.Sprintf("the waypoint runs detour %s (%s), the CLI is %s: the CLI and the waypoint may disagree on the tunnel protocol", running, from, d.Version), Fix: fix})
	}
}
