package mesh

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"github.com/detour-mesh/detour/proxy/session"
	"github.com/detour-mesh/detour/proxy/tunnel"
)

// GVRDebugSession is the DebugSession resource (manifests: the CRD in `detour install`).
var GVRDebugSession = schema.GroupVersionResource{Group: "detour.dev", Version: "v1alpha1", Resource: "debugsessions"}

// debugSessionSpec is a DebugSession's spec.
type debugSessionSpec struct {
	Session    tunnel.Spec `json:"session"`
	Holder     string      `json:"holder"`  // the developer's SPIFFE ID
	Host       string      `json:"host"`    // the service's hostname
	Replica    string      `json:"replica"` // the HBONE address of the replica holding the tunnel
	RenewTime  time.Time   `json:"renewTime"`
	TTLSeconds int         `json:"ttlSeconds"`
}

// SessionStore shares sessions between waypoint replicas as DebugSession objects: each replica
// publishes the sessions whose tunnels it holds (renewed while they live), and registers the
// others' as remote sessions, whose streams it relays to the holder over HBONE. A replica that
// dies stops renewing; the others delete its sessions once their TTL passes.
type SessionStore struct {
	Client    dynamic.Interface
	Namespace string
	Replica   string // this replica's HBONE address, as the others dial it
	Registry  *session.Registry
	// Relay returns the opener of a remote session: streams relayed to replica.
	Relay  func(replica, sessionID string) session.Opener
	TTL    time.Duration // 0 means DefaultBindTTL
	Logger *slog.Logger

	mu     sync.Mutex
	remote map[string]*session.Session // by ID
}

func (st *SessionStore) ttl() time.Duration {
	if st.TTL <= 0 {
		return DefaultBindTTL
	}
	return st.TTL
}

// Publish writes s as a DebugSession and renews it until unpublish. A DebugSession of s's ID
// already there for the same developer (the replica that held it before the developer's CLI
// moved here, and resumed it) is taken over; the renewals and the deletion touch it only while
// this replica still holds it.
func (st *SessionStore) Publish(s *session.Session) (unpublish func()) {
	ctx, cancel := context.WithCancel(context.Background())
	obj := func() *unstructured.Unstructured {
		spec, _ := json.Marshal(debugSessionSpec{Session: s.Spec, Holder: s.Holder.String(), Host: s.Host, Replica: st.Replica,
			RenewTime: time.Now().UTC(), TTLSeconds: int(st.ttl().Seconds())})
		var m map[string]any
		json.Unmarshal(spec, &m)
		return &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "detour.dev/v1alpha1", "kind": "DebugSession",
			"metadata": map[string]any{"name": s.ID, "namespace": st.Namespace, "labels": map[string]any{ManagedBy: "detour"}},
			"spec":     m,
		}}
	}
	res := st.Client.Resource(GVRDebugSession).Namespace(st.Namespace)
	written, err := res.Create(ctx, obj(), metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		written, err = st.takeOver(ctx, res, s, obj())
	}
	var rv string // the version this replica last wrote; owned by the renewing goroutine, then by unpublish
	if err != nil {
		st.log().Error("mesh: publishing a session (other replicas will not relay to it)", "session", s.ID, "err", err)
	} else {
		rv = written.GetResourceVersion()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(st.ttl() / 3)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			// Renewed only while the replica field is still this one's.
			patch, _ := json.Marshal([]map[string]any{
				{"op": "test", "path": "/spec/replica", "value": st.Replica},
				{"op": "replace", "path": "/spec/renewTime", "value": time.Now().UTC()},
			})
			u, err := res.Patch(ctx, s.ID, types.JSONPatchType, patch, metav1.PatchOptions{})
			switch {
			case err == nil:
				rv = u.GetResourceVersion()
			case ctx.Err() != nil:
			case st.heldElsewhere(ctx, res, s.ID):
				st.log().Info("mesh: another replica holds the session now; no longer renewing it", "session", s.ID)
				return
			default:
				st.log().Error("mesh: renewing a published session", "session", s.ID, "err", err)
			}
		}
	}()
	return func() {
		cancel()
		<-done
		if rv == "" {
			return
		}
		err := res.Delete(context.Background(), s.ID, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: &rv}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) { // conflict: another replica's now
			st.log().Error("mesh: unpublishing a session (it will expire)", "session", s.ID, "err", err)
		}
	}
}

// takeOver overwrites the DebugSession of s's ID when it is the same developer's session (held by
// another replica before the developer resumed it here).
func (st *SessionStore) takeOver(ctx context.Context, res dynamic.ResourceInterface, s *session.Session, obj *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	cur, err := res.Get(ctx, s.ID, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("mesh: taking over DebugSession %s: %w", s.ID, err)
	}
	spec, err := decodeSpec(cur)
	if err == nil && spec.Holder != s.Holder.String() {
		err = fmt.Errorf("mesh: DebugSession %s belongs to %s, not %s", s.ID, spec.Holder, s.Holder)
	}
	if err != nil {
		return nil, err
	}
	obj.SetResourceVersion(cur.GetResourceVersion())
	st.log().Info("mesh: taking over a session another replica held", "session", s.ID, "replica", spec.Replica)
	return res.Update(ctx, obj, metav1.UpdateOptions{})
}

// heldElsewhere reports whether DebugSession id now names another replica.
func (st *SessionStore) heldElsewhere(ctx context.Context, res dynamic.ResourceInterface, id string) bool {
	cur, err := res.Get(ctx, id, metav1.GetOptions{})
	if err != nil {
		return false
	}
	spec, err := decodeSpec(cur)
	return err == nil && spec.Replica != st.Replica
}

// Run watches DebugSessions until ctx ends, keeping the registry's remote sessions in step, and
// deletes the sessions of replicas that stopped renewing.
func (st *SessionStore) Run(ctx context.Context) error {
	st.mu.Lock()
	st.remote = map[string]*session.Session{}
	st.mu.Unlock()
	f := dynamicinformer.NewFilteredDynamicSharedInformerFactory(st.Client, 0, st.Namespace, nil)
	inf := f.ForResource(GVRDebugSession).Informer()
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { st.upsert(o) },
		UpdateFunc: func(_, o any) { st.upsert(o) },
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			if u, ok := o.(*unstructured.Unstructured); ok {
				st.drop(u.GetName())
			}
		},
	})
	if err != nil {
		return fmt.Errorf("mesh: %w", err)
	}
	f.Start(ctx.Done())
	defer f.Shutdown()
	tick := time.NewTicker(st.ttl() / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		for _, o := range inf.GetStore().List() {
			u, ok := o.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			spec, err := decodeSpec(u)
			if err == nil && time.Since(spec.RenewTime) > time.Duration(spec.TTLSeconds)*time.Second {
				st.log().Info("mesh: a replica stopped renewing its session; deleting it", "session", u.GetName(), "replica", spec.Replica)
				st.Client.Resource(GVRDebugSession).Namespace(st.Namespace).Delete(ctx, u.GetName(), metav1.DeleteOptions{})
			}
		}
	}
}

// maxSessionTTL bounds a DebugSession's ttlSeconds: a larger one (or one that overflows a
// Duration) would keep a dead replica's session forever.
const maxSessionTTL = time.Hour

func decodeSpec(u *unstructured.Unstructured) (debugSessionSpec, error) {
	var spec debugSessionSpec
	raw, err := json.Marshal(u.Object["spec"])
	if err != nil {
		return spec, fmt.Errorf("mesh: DebugSession %s: %w", u.GetName(), err)
	}
	// Strict: a field this replica does not know (a newer replica's filter condition) refuses
	// the session instead of relaying more traffic than its developer asked for.
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		return spec, fmt.Errorf("mesh: DebugSession %s: %w", u.GetName(), err)
	}
	if spec.TTLSeconds <= 0 || spec.TTLSeconds > int(maxSessionTTL/time.Second) {
		return spec, fmt.Errorf("mesh: DebugSession %s: ttlSeconds %d is outside 1..%d", u.GetName(), spec.TTLSeconds, int(maxSessionTTL.Seconds()))
	}
	return spec, nil
}

func (st *SessionStore) upsert(o any) {
	u, ok := o.(*unstructured.Unstructured)
	if !ok {
		return
	}
	spec, err := decodeSpec(u)
	if err != nil {
		st.log().Error("mesh: a DebugSession cannot be read; ignoring it", "err", err)
		return
	}
	if spec.Replica == st.Replica {
		return // ours
	}
	id := u.GetName()
	st.mu.Lock()
	defer st.mu.Unlock()
	if _, known := st.remote[id]; known {
		return
	}
	if local := st.Registry.Get(id); local != nil {
		// The developer resumed it on the other replica: this one's, waiting, ends; the next
		// renewal's event makes it a remote session here.
		if !local.Remote && local.Holder.String() == spec.Holder {
			local.Yield()
		}
		return
	}
	s, err := remoteSession(id, spec, st.Relay(spec.Replica, id))
	if err != nil {
		st.log().Error("mesh: a remote session cannot be used", "session", id, "err", err)
		return
	}
	if err := st.Registry.Add(s); err != nil {
		st.log().Error("mesh: a remote session conflicts with a local one", "session", id, "err", err)
		return
	}
	st.remote[id] = s
	st.log().Info("mesh: relaying a session held by another replica", "session", id, "replica", spec.Replica, "service", spec.Host)
}

// remoteSession is the session a DebugSession of another replica describes (its filter bounded
// and compiled as a local registration's).
func remoteSession(id string, spec debugSessionSpec, relay session.Opener) (*session.Session, error) {
	holder, err := spiffeid.FromString(spec.Holder)
	if err != nil {
		return nil, fmt.Errorf("mesh: holder %q: %w", spec.Holder, err)
	}
	return session.NewRemote(id, spec.Session, spec.Host, holder, relay)
}

func (st *SessionStore) drop(id string) {
	st.mu.Lock()
	s, ok := st.remote[id]
	delete(st.remote, id)
	st.mu.Unlock()
	if ok {
		st.Registry.Remove(s)
	}
}

func (st *SessionStore) log() *slog.Logger {
	if st.Logger != nil {
		return st.Logger
	}
	return slog.Default()
}
