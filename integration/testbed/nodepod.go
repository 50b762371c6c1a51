package testbed

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Pod is a pod the node's kubelet runs, as a testbed Pod: its sandbox's network namespace
// (found through containerd's CRI: the sandbox's pid) attached as a name under /var/run/netns
// (ip netns attach), so that Run, RunIstioHBONE, Listen and DialContext work inside it. The name
// is detached when the test ends; the namespace stays the pod's.
func (n *Node) Pod(t testing.TB, pod *corev1.Pod) *Pod {
	t.Helper()
	pid, err := n.sandboxPid(pod)
	if err != nil {
		t.Fatal(err)
	}
	p := &Pod{Name: pod.Name, Namespace: pod.Namespace, ServiceAccount: pod.Spec.ServiceAccountName, IP: pod.Status.PodIP,
		netns: "dtnode-" + string(pod.UID)[:8]}
	p.nsPath = "/var/run/netns/" + p.netns // Do, Listen and DialContext enter it by path
	if err := ipCmd("netns", "attach", p.netns, strconv.Itoa(pid)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ipCmd("netns", "del", p.netns); err != nil {
			t.Error(err)
		}
	})
	return p
}

// sandboxPid is the pid of the pod's ready sandbox (its pause process), from the CRI's verbose
// sandbox status.
func (n *Node) sandboxPid(pod *corev1.Pod) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+n.ContainerdSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return 0, fmt.Errorf("testbed: connecting to the CRI: %w", err)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	list, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{
		State:         &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY},
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": string(pod.UID)}}})
	if err != nil {
		return 0, fmt.Errorf("testbed: listing the sandboxes of pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	if len(list.Items) != 1 {
		return 0, fmt.Errorf("testbed: pod %s/%s has %d ready sandboxes, want 1", pod.Namespace, pod.Name, len(list.Items))
	}
	st, err := rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: list.Items[0].Id, Verbose: true})
	if err != nil {
		return 0, fmt.Errorf("testbed: the sandbox status of pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	var info struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(st.Info["info"]), &info); err != nil || info.Pid == 0 {
		return 0, fmt.Errorf("testbed: no pid in the sandbox status of pod %s/%s (%v): %q", pod.Namespace, pod.Name, err, st.Info["info"])
	}
	return info.Pid, nil
}
