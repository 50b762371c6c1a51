// Package node holds the tests of the test bed's real node (testbed.Options.Node, issue 18): a
// kubelet, containerd's CRI and the CNI plugins running pods from images built here, and detour
// installed on it by its own CLI (TestInstall).
package node
