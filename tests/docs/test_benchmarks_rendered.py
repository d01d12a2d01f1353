"""BENCHMARKS.md is what bench/report.py renders from the recorded runs: bench/results.json,
and the files the analysis runs recorded (soak, compile cost, the "before" runs). A figure
edited by hand, or a template changed without rendering it, fails here."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import report  # noqa: E402


def test_benchmarks_md_is_the_rendering_of_the_recorded_runs(tmp_path):
    with open(os.path.join(ROOT, "bench", "results.json")) as f:
        results = json.load(f)
    out = tmp_path / "BENCHMARKS.md"
    report.write_markdown(results, str(out), "bench/latency.svg")
    with open(os.path.join(ROOT, "BENCHMARKS.md")) as f:
        committed = f.read()
    rendered = out.read_text()
    assert "{{" not in rendered, "a placeholder of the template was not filled"
    assert committed == rendered, (
        "BENCHMARKS.md differs from bench/report.py's rendering of bench/results.json: render it with "
        "`cd bench && ../.venv/bin/python -c \"import json,report; "
        "report.write_markdown(json.load(open('results.json')), '../BENCHMARKS.md', 'bench/latency.svg')\"`")
