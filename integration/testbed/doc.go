// Package testbed runs a real control plane for detour's tests: etcd (Debian's etcd-server),
// kube-apiserver built from the k8s.io/kubernetes module, and istiod built from istio.io/istio,
// on free loopback ports with temporary directories, torn down when the test ends. Binaries are
// built once per version and cached (see EnsureBinaries). Options.Node adds a real node: a
// kubelet, containerd's CRI and CNI plugins, with kube-controller-manager and kube-scheduler
// (see Node and EnsureNodeBinaries).
package testbed
