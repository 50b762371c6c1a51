package mesh

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// written is what one Install wrote: the objects it created (they did not exist before) and the
// targets it bound (they were not bound by detour before). Objects that existed (an earlier
// install) are detour's own and stay; the rollback removes only what this install added.
type written struct {
	created []Object
	bound   []Target
}

func (w *written) String() string {
	var names []string
	for _, o := range w.created {
		names = append(names, fmt.Sprintf("%s %s", o.Body["kind"], o.Body["metadata"].(map[string]any)["name"]))
	}
	for _, t := range w.bound {
		names = append(names, "the binding of "+t.String())
	}
	if len(names) == 0 {
		return "nothing"
	}
	return strings.Join(names, ", ")
}

// write applies the objects in order and binds the targets, recording in w what it created.
func (in *Installer) write(ctx context.Context, targets []Target, w *written) error {
	for _, o := range in.Objects() {
		name := o.Body["metadata"].(map[string]any)["name"].(string)
		_, err := in.resource(o).Get(ctx, name, metav1.GetOptions{})
		existed := err == nil
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("mesh: reading %s %s: %w", o.Body["kind"], objectName(o), err)
		}
		if err := in.apply(ctx, o, false); err != nil {
			return err
		}
		if !existed && !in.DryRun {
			w.created = append(w.created, o)
		}
		in.progress("applied %s %s", o.Body["kind"], name)
	}
	for _, t := range targets {
		obj, err := in.get(ctx, t)
		if err != nil {
			return err
		}
		_, ours := obj.GetAnnotations()[PreviousAnnotation]
		if err := in.bind(ctx, t); err != nil {
			return err
		}
		if !ours && !in.DryRun {
			w.bound = append(w.bound, t)
		}
		in.progress("bound %s", t)
	}
	return nil
}

// rollbackTimeout bounds the rollback, which runs also when ctx has ended (a timed-out wait).
const rollbackTimeout = 30 * time.Second

// undo removes what w records (unbinding first, then deleting in reverse order) unless
// KeepPartial, and returns cause with what was done about it.
func (in *Installer) undo(ctx context.Context, w *written, cause error) error {
	if in.KeepPartial {
		return fmt.Errorf("%w\nmesh: kept what this install wrote (--keep-partial): %s; detour uninstall -n %s removes it", cause, w, in.Namespace)
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rollbackTimeout)
	defer cancel()
	var errs []error
	for _, t := range slices.Backward(w.bound) {
		if err := in.unbind(ctx, t); err != nil {
			errs = append(errs, err)
		}
	}
	for _, o := range slices.Backward(w.created) {
		name := o.Body["metadata"].(map[string]any)["name"].(string)
		err := in.resource(o).Delete(ctx, name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("mesh: deleting %s %s: %w", o.Body["kind"], objectName(o), err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w\nmesh: the rollback failed, remove the rest with detour uninstall -n %s: %w", cause, in.Namespace, errors.Join(errs...))
	}
	return fmt.Errorf("%w\nmesh: removed what this install wrote: %s", cause, w)
}

func (in *Installer) progress(format string, args ...any) {
	if in.Progress != nil {
		in.Progress(fmt.Sprintf(format, args...))
	}
}

// waitPoll is how often WaitReady looks.
const waitPoll = time.Second

// WaitReady waits, until ctx ends, for the Deployment to be Available and then the Gateway to be
// Programmed, reporting each change to Progress. A pod that cannot pull its image ends the wait
// at once with the reason.
func (in *Installer) WaitReady(ctx context.Context) error {
	t := time.NewTicker(waitPoll)
	defer t.Stop()
	last := ""
	for {
		state, done, err := in.readiness(ctx)
		if err != nil {
			return err
		}
		if state != last {
			in.progress("%s", state)
			last = state
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("mesh: waiting for waypoint %s/%s: %s: %w (detour doctor -n %s explains)", in.Namespace, in.name(), last, ctx.Err(), in.Namespace)
		case <-t.C:
		}
	}
}

// readiness is one look: where the rollout is, and whether it is done.
func (in *Installer) readiness(ctx context.Context) (string, bool, error) {
	d, err := in.Kube.AppsV1().Deployments(in.Namespace).Get(ctx, in.name(), metav1.GetOptions{})
	if err != nil {
		return "", false, fmt.Errorf("mesh: reading Deployment %s/%s: %w", in.Namespace, in.name(), err)
	}
	if !deploymentAvailable(d) {
		pods, err := in.Kube.CoreV1().Pods(in.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=" + in.name()})
		if err != nil {
			return "", false, fmt.Errorf("mesh: listing pods of %s/%s: %w", in.Namespace, in.name(), err)
		}
		if bad := imagePullFailures(pods.Items); len(bad) > 0 {
			return "", false, fmt.Errorf("mesh: waypoint %s/%s cannot start: %s (pass --image with an image the nodes can pull)", in.Namespace, in.name(), bad[0])
		}
		return fmt.Sprintf("Deployment %s: %d/%d replicas available", in.name(), d.Status.AvailableReplicas, in.replicas()), false, nil
	}
	gw, err := in.Client.Resource(gvrGateway).Namespace(in.Namespace).Get(ctx, in.name(), metav1.GetOptions{})
	if err != nil {
		return "", false, fmt.Errorf("mesh: reading Gateway %s/%s: %w", in.Namespace, in.name(), err)
	}
	if !gatewayProgrammed(gw.Object) {
		return fmt.Sprintf("Deployment %s available; Gateway %s: waiting for istiod to program it", in.name(), in.name()), false, nil
	}
	return fmt.Sprintf("Deployment %s available; Gateway %s Programmed", in.name(), in.name()), true, nil
}

func deploymentAvailable(d *appsv1.Deployment) bool {
	if d.Status.ObservedGeneration < d.Generation {
		return false
	}
	for _, c := range d.Status.Conditions {
		if c.Type == appsv1.DeploymentAvailable {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
