module github.com/detour-mesh/detour

go 1.26.8

require (
	github.com/spiffe/go-spiffe/v2 v2.9.0
	golang.org/x/net v0.62.0
)

require (
	go.uber.org/goleak v1.3.0 // indirect
	golang.org/x/text v0.43.0 // indirect
)
