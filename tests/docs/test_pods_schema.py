"""docs/pods.schema.json is the one format of the pods file: tests/stack validates every pods
file against it (the broker's and the API double's parsers are held to it by their Rust tests,
`reads_exactly_the_shared_schema`). Here: the files and examples we ship fit it, and the
stack's reader refuses what the broker refuses and fills in the schema's defaults."""
import re
from pathlib import Path

import pytest

from tests.stacklib import podsfile

ROOT = Path(__file__).resolve().parents[2]


def test_the_stacks_pods_file_fits_the_schema():
    pods, namespaces = podsfile.read(ROOT / "tests/pods.yaml")
    assert [p["name"] for p in pods] == ["myapp", "plain", "allowed", "forbidden"]
    assert namespaces[0]["name"] == "default"


def test_the_documented_examples_fit_the_schema():
    for doc in ("docs/broker.md", "docs/configuration.md", "docs/kube-double.md"):
        text = (ROOT / doc).read_text()
        blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("pods:")]
        for b in blocks:
            podsfile.parse(b, where=doc)
        print(f"{doc}: {len(blocks)} pods file example(s) fit the schema")


def test_defaults_are_the_schemas():
    pods, namespaces = podsfile.parse("pods: [{namespace: a, name: b}]\nnamespaces: [{name: a}]\n")
    print(pods, namespaces)
    assert pods == [{"namespace": "a", "name": "b", "ips": [], "serviceAccount": "default",
                     "phase": "Running", "hostNetwork": False, "annotations": {}}]
    assert namespaces == [{"name": "a", "annotations": {}}]
    assert podsfile.parse("") == ([], [])


@pytest.mark.parametrize("bad,why", [
    ("pods: [{namespace: a, name: b, colour: red}]", "colour"),
    ("colour: red", "colour"),
    ("namespaces: [{name: a, labels: {}}]", "labels"),
    ("pods: [{namespace: a, name: b, uid: x}]", "uid"),
    ("pods: [{name: b}]", "namespace"),
    ("pods: [{namespace: ' ', name: b}]", "does not match"),
    ("pods: [{namespace: a, name: b, ips: [not-an-ip]}]", "not-an-ip"),
    ("pods: [{namespace: a, name: b, phase: Sleeping}]", "Sleeping"),
    ("pods: [{namespace: a, name: b}, {namespace: a, name: b}]", "listed twice"),
    ("pods: {}", "not of type"),
])
def test_refuses_what_the_broker_refuses(bad, why):
    with pytest.raises(podsfile.PodsFileError) as e:
        podsfile.parse(bad, where="bad.yaml")
    print(f"{bad!r} -> {e.value}")
    assert why in str(e.value) and str(e.value).startswith("bad.yaml: ")
