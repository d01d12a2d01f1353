"""Where the build puts what the tests and benchmarks run: one place for every path.

The release build (`make broker`) is static musl for this machine's architecture, so the
broker the tests and benchmarks run is the binary the image ships (issue 13);
`make wasm` builds the filter."""
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# x86_64-unknown-linux-musl on x86_64 hosts, aarch64-unknown-linux-musl on arm64 ones
# (the Makefile's RELEASE_TARGET: `uname -m`-unknown-linux-musl).
RELEASE_TARGET = f"{platform.machine()}-unknown-linux-musl"
RELEASE_DIR = ROOT / "target" / RELEASE_TARGET / "release"
BROKER_BIN = RELEASE_DIR / "meshiam-broker"
KUBE_DOUBLE_BIN = RELEASE_DIR / "meshiam-kube-double"
SDK_CLIENT_BIN = RELEASE_DIR / "examples" / "sdk_client"
FLOOR_BIN = RELEASE_DIR / "examples" / "bench_floor"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "meshiam_filter.wasm"
# Benchmark 6's baseline, the smallest proxy-wasm HTTP filter (bench/minimal-filter).
MINIMAL_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "meshiam_bench_minimal_filter.wasm"
