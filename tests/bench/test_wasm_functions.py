"""The filter's module keeps its functions no larger than the minimal filter's largest.

V8 compiles every function of the module when a sidecar loads it, and Envoy's heap stays as
large as that compile made it: in benchmark 6, splitting one 7.6 KB function (the
configuration parser) took 1.7 MiB off each sidecar, and `wasm-opt -Oz`, which inlines into
larger functions, added 6 MiB although the module got smaller (BENCHMARKS.md, *What the
filter's VM costs*). The minimal filter's largest function is the allocator's `malloc`,
which every Rust filter has; no function of ours should be larger."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from tests.stacklib.artifacts import MINIMAL_WASM, WASM  # noqa: E402
from wasmfile import function_sizes  # noqa: E402


def test_no_function_larger_than_the_minimal_filters_largest():
    if not (os.path.exists(WASM) and os.path.exists(MINIMAL_WASM)):
        subprocess.run(["make", "wasm"], cwd=ROOT, check=True)
    ours, floor = function_sizes(WASM), function_sizes(MINIMAL_WASM)
    assert len(ours) > len(floor) > 0
    largest = sorted(ours, reverse=True)[:5]
    print(f"largest function bodies: meshiam {largest} B, minimal filter {max(floor)} B")
    assert max(ours) <= max(floor), (
        f"a function of {max(ours)} B in {WASM}, larger than the minimal filter's largest "
        f"({max(floor)} B): split it (build with MESHIAM_WASM_KEEP_NAMES=1 to see its name)")
