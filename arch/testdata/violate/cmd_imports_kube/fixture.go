// Package fixture breaks one layering rule on purpose (arch/layers_test.go).
package fixture

import _ "k8s.io/client-go/kubernetes"
