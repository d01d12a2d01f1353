"""bench/compile_cost.py builds what it says it measures: the minimal filter, and the same
with never-called functions added (the linker keeps them: they are exported). Only the
builds are checked here; the measurement is benchmark 6's (tests/bench/test_harness.py)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_variants_add_never_called_code(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_cost.py"), "--build-only",
                          "--small", "6", "--large", "200", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    v = json.loads((tmp_path / "compile_cost.json").read_text())["variants"]
    base, small, large = v["base"], v["small"], v["large"]
    print(json.dumps(v, indent=1))
    # (The small functions' loops may share one helper the compiler keeps out of line.)
    assert base["functions"] + 6 <= small["functions"] <= base["functions"] + 7
    assert base["functions"] + 1 <= large["functions"] <= base["functions"] + 2
    # Each added step is a few bytes of code at least; the large function is one body.
    assert small["code_bytes"] > base["code_bytes"] + 6 * 12 * 5
    assert large["code_bytes"] > base["code_bytes"] + 200 * 5
    assert large["largest_function_bytes"] >= min(200 * 5, base["largest_function_bytes"])
    assert v["meshiam"]["functions"] > base["functions"]
    # Nothing was measured: no benchmark figures in a build-only run.
    assert all("added_kib" not in r for r in v.values())


def test_a_variant_without_added_code_is_refused(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_cost.py"), "--build-only",
                          "--small", "0", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--small and --large need at least 1" in run.stderr
    assert not (tmp_path / "crates").exists()  # refused before building anything
