"""What V8's compile of a module costs Envoy's memory (BENCHMARKS.md, benchmark 6, *What the
filter's VM costs*).

    .venv/bin/python bench/compile_cost.py [--quick] [--record] [--out DIR] [--small N] [--large OPS]

Envoy's V8 compiles every function of a module when it loads it, with its optimising
compiler, whether or not a request ever calls the function: proxy-wasm-cpp-host starts V8
with `--no-liftoff`, and Envoy offers no V8 flag. So code that never runs still costs each
sidecar memory. This measures that price. It builds the minimal filter (bench/minimal-filter)
three ways, the same way and with the same Cargo.lock as the workspace builds its modules:

- `base`: the minimal filter as it is;
- `small`: with N small functions added (a dozen arithmetic steps each);
- `large`: with one function of OPS such steps added.

Nothing calls the added functions (they are exported, so the linker keeps them). Each
variant, and meshiam's filter, is then measured by benchmark 6 (`bench/run.py --only 6`) in
the filter's place, against `base` in the minimal filter's place, in the same run. What a
variant adds over `base` is the price of compiling its extra code, by amount of code and by
the size of one function. Writes DIR/compile_cost.json (`--record`: also
bench/compile_cost.json, which BENCHMARKS.md cites) and prints a table; about 5 minutes
(`--quick`: one round per variant, about 2). `make bench-compile-cost` runs it recorded.
"""

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, WASM, log  # noqa: E402
from wasmfile import function_sizes  # noqa: E402

MINIMAL_SRC = os.path.join(ROOT, "bench", "minimal-filter", "src", "lib.rs")
RECORD = os.path.join(ROOT, "bench", "compile_cost.json")

# One step of generated code: arithmetic, a branch or a short loop on three u64 locals.
STEPS = [
    "a = a.wrapping_add(b.rotate_left({n}));",
    "b ^= a.wrapping_mul({n});",
    "if a % {n} == 1 {{ c = c.wrapping_sub(b); }} else {{ b = b.wrapping_add(c >> 3); }}",
    "for j in 0..(b & 7) {{ c = c.wrapping_add(j * {n}); }}",
]


def function(name, steps, rng):
    body = " ".join(rng.choice(STEPS).format(n=rng.randint(2, 60)) for _ in range(steps))
    return (f"#[no_mangle]\npub extern \"C\" fn {name}(x: u64, y: u64) -> u64 {{\n"
            f"    let (mut a, mut b, mut c) = (x ^ 7, y.wrapping_mul(13), x.wrapping_add(y));\n"
            f"    {body}\n    a ^ b ^ c\n}}\n")


def extra_code(variant, small, large):
    rng = random.Random(f"meshiam-compile-cost-{variant}")  # the same code on every run
    if variant == "small":
        return "".join(function(f"never_called_{i}", 12, rng) for i in range(small))
    if variant == "large":
        return function("never_called", large, rng)
    return ""


def proxy_wasm_version():
    """The proxy-wasm crate's version in the workspace's Cargo.lock."""
    with open(os.path.join(ROOT, "Cargo.lock")) as f:
        lock = f.read()
    for block in lock.split("[[package]]"):
        if 'name = "proxy-wasm"' in block:
            return block.split('version = "', 1)[1].split('"', 1)[0]
    raise RuntimeError("proxy-wasm is not in Cargo.lock")


def build(out, variant, small, large):
    """Builds one variant as the workspace builds the minimal filter; returns its .wasm."""
    crate = os.path.join(out, "crates", variant)
    os.makedirs(os.path.join(crate, "src"), exist_ok=True)
    name = f"meshiam-compile-cost-{variant}"
    with open(os.path.join(crate, "Cargo.toml"), "w") as f:
        f.write(f"""[package]
name = "{name}"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
proxy-wasm = "={proxy_wasm_version()}"

# As the workspace's release profile builds its wasm modules (Cargo.toml).
[profile.release]
opt-level = "z"
lto = true
codegen-units = 1
strip = true

[workspace]
""")
    with open(os.path.join(crate, "build.rs"), "w") as f:
        f.write(f'include!({json.dumps(os.path.join(ROOT, "build-support", "wasm_strip.rs"))});\n\n'
                "fn main() {\n    strip_wasm_names();\n}\n")
    with open(MINIMAL_SRC) as src, open(os.path.join(crate, "src", "lib.rs"), "w") as f:
        f.write(src.read() + "\n" + extra_code(variant, small, large))
    shutil.copy(os.path.join(ROOT, "Cargo.lock"), os.path.join(crate, "Cargo.lock"))
    target = os.path.join(out, "target")
    subprocess.run(["cargo", "build", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                    os.path.join(crate, "Cargo.toml")], check=True, env={**os.environ, "CARGO_TARGET_DIR": target})
    return os.path.join(target, "wasm32-wasip1", "release", name.replace("-", "_") + ".wasm")


def module_facts(path):
    sizes = function_sizes(path)
    return {"wasm_bytes": os.path.getsize(path), "functions": len(sizes), "code_bytes": sum(sizes),
            "largest_function_bytes": max(sizes)}


def measure(out, name, wasm, base, quick):
    """Benchmark 6 with `wasm` in the filter's place and `base` in the minimal filter's."""
    run_out = os.path.join(out, name)
    argv = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--only", "6", "--no-markdown", "--out", run_out]
    if quick:
        argv.append("--quick")
    env = {**os.environ, "MESHIAM_BENCH_WASM": wasm, "MESHIAM_BENCH_MINIMAL_WASM": base}
    subprocess.run(argv, check=True, env=env)  # its progress lines show
    with open(os.path.join(run_out, "results.json")) as f:
        r = json.load(f)["benchmarks"]["6_size"]
    return {"added_kib": r["filter_cost_1_worker_kib"], "base_added_kib": r["minimal_cost_1_worker_kib"],
            "ratio": r["filter_vs_minimal_cost"], "rounds": r["rounds"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "compile-cost"),
                    help="where the variants are built and measured, and compile_cost.json written")
    ap.add_argument("--small", type=int, default=240, help="small functions in the `small` variant")
    ap.add_argument("--large", type=int, default=1200, help="steps of the one function in `large`")
    ap.add_argument("--quick", action="store_true", help="one round of benchmark 6 per variant")
    ap.add_argument("--build-only", action="store_true", help="build the variants, print their facts, stop")
    ap.add_argument("--record", action="store_true", help="also write bench/compile_cost.json (BENCHMARKS.md cites it)")
    args = ap.parse_args()
    if args.small < 1 or args.large < 1:
        ap.error("--small and --large need at least 1: a variant without added code measures nothing")
    if not os.path.exists(WASM):
        sys.exit(f"missing {WASM}: run `make build` (the meshiam filter is measured too)")
    os.makedirs(args.out, exist_ok=True)
    log(f"compile cost: building the minimal filter as it is, with {args.small} small functions and with "
        f"one function of {args.large} steps (nothing calls them)")
    try:
        wasm = {v: build(args.out, v, args.small, args.large) for v in ("base", "small", "large")}
    except subprocess.CalledProcessError as e:
        sys.exit(f"compile cost: building a variant failed (cargo exited {e.returncode}; its output is above)")
    wasm["meshiam"] = WASM
    rows = {v: module_facts(p) for v, p in wasm.items()}
    if not args.build_only:
        for v in ("small", "large", "meshiam"):
            log(f"compile cost: benchmark 6 with `{v}` in the filter's place, `base` as the minimal filter")
            try:
                rows[v].update(measure(args.out, v, wasm[v], wasm["base"], args.quick))
            except subprocess.CalledProcessError as e:
                sys.exit(f"compile cost: benchmark 6 failed for `{v}` (exit {e.returncode}; its log is above)")
    base = rows["base"]
    print(f"{'variant':10} {'wasm B':>9} {'functions':>9} {'code B':>9} {'largest':>8} "
          f"{'added MiB':>10} {'base MiB':>9} {'ratio':>6} {'KiB per KB code':>16}")
    for v, r in rows.items():
        line = (f"{v:10} {r['wasm_bytes']:>9,} {r['functions']:>9} {r['code_bytes']:>9,} "
                f"{r['largest_function_bytes']:>8,}")
        if "added_kib" in r:
            extra_code_kb = (r["code_bytes"] - base["code_bytes"]) / 1000
            r["kib_per_kb_of_code"] = (r["added_kib"] - r["base_added_kib"]) / extra_code_kb
            line += (f" {r['added_kib'] / 1024:>10.1f} {r['base_added_kib'] / 1024:>9.1f} {r['ratio']:>6.2f}"
                     f" {r['kib_per_kb_of_code']:>16.1f}")
        print(line)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {"command": " ".join(["bench/compile_cost.py"] + sys.argv[1:]), "git": git.stdout.strip(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "small": args.small,
              "large": args.large, "quick": args.quick, "variants": rows}
    with open(os.path.join(args.out, "compile_cost.json"), "w") as f:
        json.dump(result, f, indent=2)
    written = [os.path.join(args.out, "compile_cost.json")]
    if args.record and not args.build_only:
        shutil.copy(written[0], RECORD)
        written.append(RECORD)
    log(f"compile cost: {', '.join(written)}")


if __name__ == "__main__":
    main()
