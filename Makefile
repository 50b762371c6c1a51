# detour: make is the front door. `make help` lists the targets.
GO        ?= go
BIN       ?= bin
FUZZTIME  ?= 10s
BENCHTIME ?= 2s
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: help build release test test-unit test-integration testbed conformance verify fuzz bench bench-waypoint demo clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

build: ## build bin/detour
	$(GO) build -ldflags "-X github.com/detour-mesh/detour/cmd/detour/cli.Version=$(VERSION)" -o $(BIN)/detour ./cmd/detour

# make release: one archive per platform, dist/detour_$(VERSION)_OS_ARCH.tar.gz (.zip for windows),
# holding detour_$(VERSION)_OS_ARCH/detour[.exe] and README.md, and dist/SHA256SUMS over them.
DIST      ?= dist
PLATFORMS ?= linux/amd64 linux/arm64 darwin/amd64 darwin/arm64 windows/amd64
SHA256    ?= $(shell command -v sha256sum >/dev/null 2>&1 && echo sha256sum || echo shasum -a 256)
release: ## cross-build the five platforms into dist/ (-trimpath, version stamped): tar.gz (zip for windows) and SHA256SUMS
	rm -rf $(DIST) && mkdir -p $(DIST)
	@set -e; for p in $(PLATFORMS); do \
	  os=$${p%/*}; arch=$${p#*/}; name=detour_$(VERSION)_$${os}_$${arch}; exe=; [ $$os = windows ] && exe=.exe; \
	  echo "release $$name"; mkdir -p $(DIST)/$$name; \
	  GOOS=$$os GOARCH=$$arch CGO_ENABLED=0 $(GO) build -trimpath \
	    -ldflags "-s -w -X github.com/detour-mesh/detour/cmd/detour/cli.Version=$(VERSION)" -o $(DIST)/$$name/detour$$exe ./cmd/detour; \
	  cp README.md $(DIST)/$$name/; \
	  if [ $$os = windows ]; then (cd $(DIST) && zip -qr $$name.zip $$name); else tar -C $(DIST) -czf $(DIST)/$$name.tar.gz $$name; fi; \
	  rm -rf $(DIST)/$$name; \
	done
	cd $(DIST) && $(SHA256) detour_* > SHA256SUMS && cat SHA256SUMS

demo: build ## run detour's HBONE data path on an embedded default (no cluster)
	$(BIN)/detour demo

test: test-unit test-integration ## unit and integration tests, with -race

test-unit: ## unit tests of the main module, with -race
	$(GO) test -race -count=1 ./...

test-integration: testbed ## interop tests against Istio's own code and the real control plane (integration/ module), with -race
	cd integration && $(GO) test -race -count=1 -timeout 30m ./...

conformance: ## the Gateway API mesh conformance suite on the test bed's node, detour the waypoint (root, minutes; TEST=Name runs one); results in bin/conformance
	cd integration && $(GO) test -p 1 -count=1 -v -timeout 40m -run '^TestMeshConformance$$$(if $(TEST),/^$(TEST)$$)' ./conformance/

testbed: ## build and cache kube-apiserver, istiod and the node's kubelet, controller-manager, scheduler and kube-proxy for the test bed (minutes the first time, then instant)
	cd integration && $(GO) run ./testbed/build

verify: ## fail on gofmt, go vet or go mod tidy drift, a main module that does not vet on darwin and windows, or a cmd/detour that does not build for linux, darwin and windows
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd integration && $(GO) vet ./...
	GOOS=darwin $(GO) vet ./...
	GOOS=windows $(GO) vet ./...
	$(GO) mod tidy -diff
	cd integration && $(GO) mod tidy -diff
	@for p in linux/amd64 linux/arm64 darwin/amd64 darwin/arm64 windows/amd64; do \
	  echo "cross-build $$p"; GOOS=$${p%/*} GOARCH=$${p#*/} CGO_ENABLED=0 $(GO) build -trimpath -o /dev/null ./cmd/detour || exit 1; \
	done

fuzz: ## short run of every fuzz target (FUZZTIME each)
	@for pkg in $$($(GO) list ./...); do \
	  for t in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$t"; \
	    $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

BENCHCOUNT ?= 5
bench: ## side-by-side benchmarks (detour vs Istio's Go HBONE vs TLS vs TCP), medians and ratios; see BENCHMARKS.md
	cd integration && $(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) -count $(BENCHCOUNT) -benchmem ./bench/ | tee $(CURDIR)/bench.out
	cd integration && $(GO) run ./bench/ratio < $(CURDIR)/bench.out

bench-waypoint: build ## the waypoint as its own process on CPU 1, client and backend on CPU 0 (BENCHMARKS.md)
	cd integration && $(GO) test -c -o $(CURDIR)/$(BIN)/bench.test ./bench/
	cd integration/bench && DETOUR_BENCH_BIN=$(CURDIR)/$(BIN)/detour taskset -c 0 $(CURDIR)/$(BIN)/bench.test -test.run '^$$' \
		-test.bench 'Pinned' -test.benchtime $(BENCHTIME) -test.count $(BENCHCOUNT) | tee $(CURDIR)/bench-waypoint.out

.PHONY: image
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
image: ## detour's linux/amd64+arm64 image, no Docker, reproducible, as an OCI layout tar: $(BIN)/detour-image.tar (RELEASING.md)
	@mkdir -p $(BIN)
	cd integration && $(GO) run ./image/build -source .. -version $(VERSION) -revision "$$(git rev-parse HEAD 2>/dev/null)" \
		-created $(SOURCE_DATE_EPOCH) -o $(CURDIR)/$(BIN)/detour-image.tar

.PHONY: chart
chart: ## regenerate the Helm chart charts/detour from mesh.Installer (integration/chart checks helm template = install --print)
	$(GO) test -count=1 ./mesh -run '^TestChartIsGenerated$$' -update

clean: ## remove build output
	rm -rf $(BIN) $(DIST)
