# meshiam task runner. `make demo` and `make test` are the README's two commands; CI runs
# `make test` (.ci/run). Every target sets up what it needs first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
WASM := target/wasm32-wasip1/release/meshiam_filter.wasm
# The release build is static musl for this machine's architecture: the broker that the tests,
# the demo and the benchmarks run is the binary the image ships (tests/stacklib/artifacts.py
# names the same paths). aws-lc's C code builds with musl-gcc (Debian's musl-tools, which
# scripts/setup installs as root).
RELEASE_TARGET := $(shell uname -m)-unknown-linux-musl
RELEASE_DIR := target/$(RELEASE_TARGET)/release
BROKER := $(RELEASE_DIR)/meshiam-broker

.PHONY: help setup build wasm broker broker-static demo test lint unit integration clean fuzz fuzz-smoke manifests

help:
	@echo "make demo   - set up, build, run the local demo"
	@echo "make test   - set up, build, run every test (what CI runs)"
	@echo "make lint   - rustfmt and clippy (host and wasm)"
	@echo "make build  - release filter (.wasm) and broker"
	@echo "make broker-static - static musl brokers (x86_64, aarch64) for the images"
	@echo "make manifests - regenerate the plain-Envoy sidecar config (after editing envoy/sidecar.yaml)"
	@echo "make fuzz   - run every fuzz target for FUZZ_SECONDS (default 30) each"
	@echo "make bench  - the benchmarks (BENCHMARKS.md); 8-9 use the local stack"
	@echo "make bench-compile-cost - what V8's compile of never-called code costs Envoy (bench/compile_cost.json)"
	@echo "make soak   - pods in SDK loops with pods churning for SOAK_SECONDS (default 180): errors, memory"

setup:
	@scripts/setup

# The minimal proxy-wasm filter (bench/minimal-filter) is benchmark 6's baseline; it is tiny.
wasm:
	cargo build --release --target wasm32-wasip1 -p meshiam-filter -p meshiam-bench-minimal-filter
	@ls -l $(WASM) | awk '{printf "filter size: %d bytes\n", $$5}'

broker: setup
	CC_$(subst -,_,$(RELEASE_TARGET))=musl-gcc cargo build --release --target $(RELEASE_TARGET) \
	  -p meshiam-broker -p meshiam-kube-double --bins --example sdk_client --example bench_floor
	@ls -l $(BROKER) | awk '{printf "broker: %d bytes, static %s\n", $$5, "$(RELEASE_TARGET)"}'

build: wasm broker

# The static musl brokers for both architectures (images/build.sh --broker-bin-arm64), linked
# with Zig (cargo-zigbuild and ziglang from PyPI, build-support/static-requirements.txt): no
# musl C toolchain or cross compiler needed. About 10 CPU-minutes per architecture (measured:
# 9.4 and 15.5 minutes of wall clock on 2 shared, busy cores). `make build` (and so `make
# test`) already builds this machine's architecture with musl-gcc; this target is for the
# other one. STATIC_TARGETS picks the architectures.
STATIC_TARGETS ?= x86_64-unknown-linux-musl aarch64-unknown-linux-musl
broker-static: setup
	$(VENV)/bin/pip install -q -r build-support/static-requirements.txt
	rustup target add $(STATIC_TARGETS)
	for t in $(STATIC_TARGETS); do \
	  PATH="$(abspath $(VENV))/bin:$$PATH" cargo zigbuild --release --target $$t -p meshiam-broker || exit 1; \
	done
	@ls -l $(foreach t,$(STATIC_TARGETS),target/$(t)/release/meshiam-broker)

# The plain-Envoy component's envoy.yaml is envoy/sidecar.yaml rendered for a cluster; it is
# committed (kustomize renders from a clone) and tests/deploy checks it against a fresh render.
SIDECAR_SETS := BROKER_ADDRESS=169.254.170.52 BROKER_PORT=8787 WASM_PATH=/meshiam/filter/plugin.wasm \
	POD_NAME=@POD_NAME@ POD_NAMESPACE=@POD_NAMESPACE@ NODE_ID=sidecar~@POD_NAME@.@POD_NAMESPACE@ \
	POD_IPS=@POD_IPS@
manifests:
	python3 envoy/render.py $(addprefix --set ,$(SIDECAR_SETS)) \
	  -o manifests/overlays/plain-envoy/sidecar/envoy.yaml

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 -p meshiam-filter -p meshiam-imds -- -D warnings

unit:
	cargo test --workspace

integration: build
	$(PY) -m pytest -q tests

test: setup lint unit fuzz-smoke integration

# Fuzzing (fuzz/, cargo-fuzz on nightly; see fuzz/Cargo.toml). `make fuzz` runs every target
# for FUZZ_SECONDS each (new inputs go to fuzz/out/, crashes to fuzz/out/artifacts/; a crash
# is fixed and its input committed to fuzz/corpus/<target>/, which `cargo test` replays).
# `make test` runs the targets that build quickly for FUZZ_SMOKE_SECONDS each; the broker's
# two targets instrument the whole broker (kube, the AWS SDK, aws-lc: ~14 CPU-minutes of
# build from clean, against ~45 s for the other five), so `make test` only replays their
# corpus (broker/tests/fuzz_corpus.rs, in `make unit`).
FUZZ_SECONDS ?= 30
FUZZ_SMOKE_SECONDS ?= 5
FUZZ_QUICK := imds_path imds_token imds_ttl imds_creds_json filter_config
FUZZ_BROKER := broker_policy broker_pods_file
test fuzz fuzz-smoke: export MESHIAM_WITH_FUZZ := 1

fuzz-smoke: setup
	scripts/fuzz $(FUZZ_SMOKE_SECONDS) $(FUZZ_QUICK)

fuzz: setup
	scripts/fuzz $(FUZZ_SECONDS) $(FUZZ_QUICK) $(FUZZ_BROKER)

demo: setup build
	@scripts/demo

clean:
	cargo clean

# Benchmarks (issues 6 and 10, BENCHMARKS.md): `make bench` runs them all (under 17 minutes
# on 2 cores) and writes bench/results.json and BENCHMARKS.md; `make bench-quick` only checks
# the harness (brief runs, results in bench/out/quick). Not part of `make test`'s timing runs.
# Benchmarks 8-9 and `make soak` bring up the local stack (tests/stack): on a machine shared
# with other stack users, run them under `flock /tmp/meshiam-stack.lock`.
.PHONY: bench bench-quick bench-compile-cost soak

# `build` also builds bench_floor, the hyper floor server of benchmark 3 (one cargo call, so
# the dependencies are built once with one feature set).
bench: setup build
	$(PY) bench/run.py

bench-quick: setup build
	$(PY) bench/run.py --quick

# What V8's compile of a module costs Envoy (benchmark 6's analysis, BENCHMARKS.md): the
# minimal filter with never-called code added, through benchmark 6; about 5 minutes. Writes
# bench/compile_cost.json.
bench-compile-cost: setup build
	$(PY) bench/compile_cost.py --record

# Soak (issue 10): pods in SDK-like loops while pods churn, on the local stack; not part of
# `make test`. Exits non-zero on any error or memory that is not flat; the summary goes to
# bench/out/soak/summary.json (`bench/soak.py --record` also writes BENCHMARKS.md's section).
SOAK_SECONDS ?= 180

soak: setup build
	$(PY) bench/soak.py --seconds $(SOAK_SECONDS)
