// Package testbed runs a real control plane for detour's tests: etcd (Debian's etcd-server),
// kube-apiserver built from the k8s.io/kubernetes module, and istiod built from istio.io/istio,
// on free loopback ports with temporary directories, torn down when the test ends. Binaries are
// built once per version and cached (see EnsureBinaries).
package testbed
