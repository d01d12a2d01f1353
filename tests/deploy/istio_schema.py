"""Istio's own schemas for the Istio objects meshiam ships, per supported Istio minor.

istio_crds/<minor>.json holds the openAPIV3Schema of each kind as Istio's CRDs define it
(istio/api kubernetes/customresourcedefinitions.gen.yaml at the newest patch tag of the
minor; istio_crds/vendor.py regenerates them). The API server prunes unknown fields
silently (Istio's CRDs preserve unknown fields only inside pluginConfig), so a typo would be
dropped, not refused: here every object schema is closed (additionalProperties: false unless
the CRD says x-kubernetes-preserve-unknown-fields), so an unknown or misspelt field fails.
Enums (failStrategy, tls.mode, resolution ...) are the version's own: FAIL_RELOAD, for one,
validates from 1.27 on only. CEL rules (x-kubernetes-validations) are not evaluated.
"""

import copy
import json
from functools import lru_cache
from pathlib import Path

import jsonschema

CRDS = Path(__file__).resolve().parent / "istio_crds"
# The Istio minors meshiam supports (docs/install.md, "Requirements").
ISTIO_VERSIONS = ("1.24", "1.25", "1.26", "1.27", "1.28", "1.29", "1.30")
# Fields that exist in every supported minor (the objects meshiam ships use only these).
KINDS = {("extensions.istio.io/v1alpha1", "WasmPlugin"), ("networking.istio.io/v1", "ServiceEntry"),
         ("networking.istio.io/v1", "DestinationRule"), ("networking.istio.io/v1alpha3", "EnvoyFilter")}

_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def _closed(schema):
    """Returns the schema with every object that lists its properties closed."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def schema(api_version, kind, minor, *, namespaced=True):
    data = json.loads((CRDS / f"{minor}.json").read_text())
    crd = copy.deepcopy(data[f"{api_version} {kind}"])
    crd = _closed(crd)
    props = crd["properties"]
    props.pop("status", None)
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    props["metadata"] = _METADATA if namespaced else {**_METADATA, "required": ["name"]}
    crd["required"] = sorted(set(crd.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    crd["additionalProperties"] = False
    return crd


def is_istio(obj):
    return (obj.get("apiVersion"), obj.get("kind")) in KINDS


def validate(obj, minor, *, namespaced=True):
    """Raises jsonschema.ValidationError unless obj is valid for Istio `minor`."""
    jsonschema.validate(obj, schema(obj["apiVersion"], obj["kind"], minor, namespaced=namespaced))
