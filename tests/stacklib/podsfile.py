"""The pods file as tests/stack reads it: validated against docs/pods.schema.json, the one
format the broker's file source and the Kubernetes API double read too (their tests hold
their parsers to the same schema), with the schema's defaults filled in.

jsonschema comes with the test tools (a dependency of kubernetes-validate, tests/requirements.txt).
"""
import copy
import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs/pods.schema.json"


class PodsFileError(ValueError):
    pass


def schema():
    return json.loads(SCHEMA_FILE.read_text())


def _defaults(sch, kind):
    props = sch["$defs"][kind]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def validate(doc, where="pods file"):
    """Raises PodsFileError naming the first problem, as the broker would refuse the file."""
    sch = schema()
    validator = jsonschema.Draft202012Validator(sch, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path) or "top level"
        raise PodsFileError(f"{where}: {at.lstrip('.')}: {e.message}")
    pods, namespaces = doc.get("pods", []), doc.get("namespaces", [])
    seen = set()
    for i, p in enumerate(pods):
        key = (p["namespace"], p["name"])
        if key in seen:
            raise PodsFileError(f"{where}: pods[{i}]: {p['namespace']}/{p['name']} is listed twice")
        seen.add(key)
    names = [n["name"] for n in namespaces]
    if len(set(names)) != len(names):
        raise PodsFileError(f"{where}: a namespace is listed twice")


def parse(text, where="pods file"):
    """(pods, namespaces) of a pods file's text, every default of the schema filled in."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PodsFileError(f"{where}: {e}")
    if doc is None:  # an empty file: no pods (the broker reads it so too)
        doc = {}
    validate(doc, where)
    sch = schema()
    pods = [dict(copy.deepcopy(_defaults(sch, "pod")), **p) for p in doc.get("pods", [])]
    namespaces = [dict(copy.deepcopy(_defaults(sch, "namespace")), **n) for n in doc.get("namespaces", [])]
    return pods, namespaces


def read(path):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PodsFileError(f"cannot read pods file {path}: {e}")
    return parse(text, where=str(path))
