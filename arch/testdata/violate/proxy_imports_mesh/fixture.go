// Package fixture breaks one layering rule on purpose (arch/layers_test.go).
package fixture

import _ "github.com/detour-mesh/detour/mesh"
