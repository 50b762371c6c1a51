package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Per-session binding: a session may bind an unbound Service to this waypoint for its own life.
// A Lease (renewed while the session lives) records it, so that if the waypoint dies with the
// session, any replica's reconciler reverts the binding once the lease expires.
const (
	// DefaultBindTTL is how long a binding outlives its last renewal.
	DefaultBindTTL = 15 * time.Second
	// LeaseLabel marks detour's binding leases; its value is the bound Service's name.
	LeaseLabel = "detour.dev/binding-for"
	// LeaseSession annotates a binding lease with its session's ID, so that the replica a
	// resumed session moves to takes the binding over instead of refusing a bound service.
	LeaseSession = "detour.dev/session"
)

// Binder binds services for sessions. The zero TTL means DefaultBindTTL.
type Binder struct {
	Kube      kubernetes.Interface
	Waypoint  string // the Gateway's name
	Namespace string // the Gateway's namespace
	Holder    string // this replica, for the leases' holderIdentity
	TTL       time.Duration
	Logger    *slog.Logger
	Now       func() time.Time // nil means time.Now
}

func (b *Binder) ttl() time.Duration {
	if b.TTL <= 0 {
		return DefaultBindTTL
	}
	return b.TTL
}

func (b *Binder) now() time.Time {
	if b.Now != nil {
		return b.Now()
	}
	return time.Now()
}

func leaseName(svc string) string { return "detour-bind-" + svc }

// Bind binds namespace/svc to the waypoint until release is called or ctx ends (then the
// binding is reverted). A service already bound (to any waypoint, or through its namespace) is
// refused: a session binds only what nobody bound.
//
// session is the session's ID, recorded on the lease: a Bind for the same session while another
// replica holds its binding (the developer's CLI resumed the session here) takes the binding
// over, and that replica's release then leaves it alone.
func (b *Binder) Bind(ctx context.Context, namespace, svc, session string) (release func(), err error) {
	if namespace != b.Namespace {
		return nil, fmt.Errorf("mesh: binding %s/%s: this waypoint binds services of namespace %s only", namespace, svc, b.Namespace)
	}
	s, err := b.Kube.CoreV1().Services(namespace).Get(ctx, svc, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("mesh: binding %s/%s: %w", namespace, svc, err)
	}
	if took, err := b.takeOver(ctx, namespace, svc, session, s.Labels[UseWaypoint]); err != nil || took {
		if err != nil {
			return nil, err
		}
		return b.hold(ctx, namespace, svc), nil
	}
	if v, ok := s.Labels[UseWaypoint]; ok {
		return nil, fmt.Errorf("mesh: service %s/%s already has %s=%s; a session binds only unbound services", namespace, svc, UseWaypoint, v)
	}
	ns, err := b.Kube.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
	if err != nil && !apierrors.IsForbidden(err) { // a namespaced Role cannot read Namespaces
		return nil, fmt.Errorf("mesh: binding %s/%s: %w", namespace, svc, err)
	}
	if v := ns.GetLabels()[UseWaypoint]; err == nil && v != "" {
		return nil, fmt.Errorf("mesh: namespace %s is bound to waypoint %s; bind the namespace to detour instead (detour install --bind namespace)", namespace, v)
	}
	dur := int32(b.ttl().Seconds())
	now := metav1.NewMicroTime(b.now())
	lease := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: leaseName(svc), Namespace: namespace, Labels: map[string]string{LeaseLabel: svc, ManagedBy: "detour"},
			Annotations: map[string]string{LeaseSession: session}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &b.Holder, LeaseDurationSeconds: &dur, AcquireTime: &now, RenewTime: &now},
	}
	if _, err := b.Kube.CoordinationV1().Leases(namespace).Create(ctx, lease, metav1.CreateOptions{}); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("mesh: service %s/%s is already bound by another session", namespace, svc)
		}
		return nil, fmt.Errorf("mesh: binding %s/%s: lease: %w", namespace, svc, err)
	}
	if err := b.label(ctx, namespace, svc, true); err != nil {
		b.Kube.CoordinationV1().Leases(namespace).Delete(context.WithoutCancel(ctx), leaseName(svc), metav1.DeleteOptions{})
		return nil, err
	}
	b.log().Info("mesh: session bound a service to the waypoint", "service", namespace+"/"+svc, "session", session, "ttl", b.ttl())
	return b.hold(ctx, namespace, svc), nil
}

// takeOver moves the binding of session to this replica when another holds it (a lease of the
// same session and a label naming this waypoint): took reports it did. Another session's
// binding, or none, is left to Bind.
func (b *Binder) takeOver(ctx context.Context, namespace, svc, session, label string) (took bool, err error) {
	if session == "" || label != b.Waypoint {
		return false, nil
	}
	leases := b.Kube.CoordinationV1().Leases(namespace)
	l, err := leases.Get(ctx, leaseName(svc), metav1.GetOptions{})
	if apierrors.IsNotFound(err) || err == nil && l.Annotations[LeaseSession] != session {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("mesh: binding %s/%s: lease: %w", namespace, svc, err)
	}
	from := deref(l.Spec.HolderIdentity)
	now := metav1.NewMicroTime(b.now())
	l.Spec.HolderIdentity, l.Spec.RenewTime = &b.Holder, &now
	if _, err := leases.Update(ctx, l, metav1.UpdateOptions{FieldManager: FieldManager}); err != nil { // resourceVersion: one replica wins
		return false, fmt.Errorf("mesh: binding %s/%s: taking over session %s's binding from %s: %w", namespace, svc, session, from, err)
	}
	b.log().Info("mesh: took over a resumed session's binding", "service", namespace+"/"+svc, "session", session, "from", from)
	return true, nil
}

// hold renews the binding's lease until release is called or ctx ends, and reverts it then.
func (b *Binder) hold(ctx context.Context, namespace, svc string) (release func()) {
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(b.ttl() / 3)
		defer tick.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case <-tick.C:
				b.renew(rctx, namespace, svc)
			}
		}
	}()
	var once bool
	return func() {
		if once {
			return
		}
		once = true
		cancel()
		<-done
		if err := b.release(context.Background(), namespace, svc); err != nil {
			b.log().Error("mesh: reverting a session's binding (the lease will expire)", "service", namespace+"/"+svc, "err", err)
		}
	}
}

// release reverts this replica's binding of svc, unless another replica took it over.
func (b *Binder) release(ctx context.Context, namespace, svc string) error {
	l, err := b.Kube.CoordinationV1().Leases(namespace).Get(ctx, leaseName(svc), metav1.GetOptions{})
	if err == nil && deref(l.Spec.HolderIdentity) != b.Holder {
		b.log().Info("mesh: a session's binding moved to another replica; left to it", "service", namespace+"/"+svc, "holder", deref(l.Spec.HolderIdentity))
		return nil
	}
	return b.unbind(ctx, namespace, svc)
}

func (b *Binder) renew(ctx context.Context, namespace, svc string) {
	if l, err := b.Kube.CoordinationV1().Leases(namespace).Get(ctx, leaseName(svc), metav1.GetOptions{}); err == nil && deref(l.Spec.HolderIdentity) != b.Holder {
		return // taken over by the replica the session moved to
	}
	now := metav1.NewMicroTime(b.now())
	patch, _ := json.Marshal(map[string]any{"spec": map[string]any{"renewTime": now}})
	if _, err := b.Kube.CoordinationV1().Leases(namespace).Patch(ctx, leaseName(svc), types.MergePatchType, patch, metav1.PatchOptions{}); err != nil && ctx.Err() == nil {
		b.log().Error("mesh: renewing a binding lease", "service", namespace+"/"+svc, "err", err)
	}
}

// label sets (or removes) use-waypoint on the service.
func (b *Binder) label(ctx context.Context, namespace, svc string, on bool) error {
	var v any
	if on {
		v = b.Waypoint
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{UseWaypoint: v}}})
	_, err := b.Kube.CoreV1().Services(namespace).Patch(ctx, svc, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager})
	if err != nil && !(apierrors.IsNotFound(err) && !on) {
		return fmt.Errorf("mesh: labelling %s/%s: %w", namespace, svc, err)
	}
	return nil
}

// unbind removes the label (only if it still names this waypoint) and the lease.
func (b *Binder) unbind(ctx context.Context, namespace, svc string) error {
	var errs []error
	s, err := b.Kube.CoreV1().Services(namespace).Get(ctx, svc, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		errs = append(errs, err)
	case s.Labels[UseWaypoint] == b.Waypoint:
		errs = append(errs, b.label(ctx, namespace, svc, false))
	}
	if err := b.Kube.CoordinationV1().Leases(namespace).Delete(ctx, leaseName(svc), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	b.log().Info("mesh: session binding reverted", "service", namespace+"/"+svc)
	return nil
}

// Run reverts bindings whose lease expired (its session's waypoint died), every ttl/3,
// until ctx ends. Every replica runs it; reverting twice is harmless.
func (b *Binder) Run(ctx context.Context) error {
	tick := time.NewTicker(b.ttl() / 3)
	defer tick.Stop()
	for {
		b.reconcileOnce(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (b *Binder) reconcileOnce(ctx context.Context) {
	leases, err := b.Kube.CoordinationV1().Leases(b.Namespace).List(ctx, metav1.ListOptions{LabelSelector: LeaseLabel})
	if err != nil {
		if ctx.Err() == nil {
			b.log().Error("mesh: listing binding leases", "err", err)
		}
		return
	}
	for _, l := range leases.Items {
		if !expired(l, b.now()) {
			continue
		}
		svc := l.Labels[LeaseLabel]
		b.log().Info("mesh: a session binding expired (its waypoint is gone); reverting", "service", b.Namespace+"/"+svc, "holder", deref(l.Spec.HolderIdentity))
		if err := b.unbind(ctx, b.Namespace, svc); err != nil {
			b.log().Error("mesh: reverting an expired binding", "service", b.Namespace+"/"+svc, "err", err)
		}
	}
}

func expired(l coordinationv1.Lease, now time.Time) bool {
	if l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		return true
	}
	return now.After(l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second))
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (b *Binder) log() *slog.Logger {
	if b.Logger != nil {
		return b.Logger
	}
	return slog.Default()
}
