"""The fields of the Istio objects meshiam ships, as JSON Schemas that reject anything else.

Written from Istio's published API for the versions the Istio overlay names (1.24-1.27):
the CustomResourceDefinitions generated from istio/api
(https://github.com/istio/api/blob/master/kubernetes/customresourcedefinitions.gen.yaml,
`wasmplugins.extensions.istio.io` v1alpha1 and `serviceentries.networking.istio.io` v1) and
the reference pages https://istio.io/docs/reference/config/proxy_extensions/wasm-plugin/ and
https://istio.io/docs/reference/config/networking/service-entry/.

Only fields we could place in every named version are listed: failStrategy FAIL_RELOAD
is left out (absent from the 1.23 API, present in 1.27; we did not pin down where it
appeared), and so are targetRef/targetRefs, which meshiam does not use. Unlike Istio's CRDs, which
preserve unknown fields only inside pluginConfig, every object here is closed: an unknown
or misspelt field fails the test instead of being silently dropped by the API server.
"""

ISTIO_VERSIONS = ("1.24", "1.25", "1.26", "1.27")

_STRING_LIST = {"type": "array", "items": {"type": "string"}}
_LABELS = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}
_PORT_NUMBER = {"type": "integer", "minimum": 1, "maximum": 65535}

_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}

WASM_PLUGIN_SPEC = {
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "selector": {
            "type": "object",
            "properties": {"matchLabels": _LABELS},
            "additionalProperties": False,
        },
        "url": {"type": "string", "minLength": 1, "pattern": "^(oci|https?|file)://"},
        "sha256": {"type": "string", "pattern": "(^$|^[a-f0-9]{64}$)"},
        "imagePullPolicy": {"enum": ["UNSPECIFIED_POLICY", "IfNotPresent", "Always"]},
        "imagePullSecret": {"type": "string", "minLength": 1, "maxLength": 253},
        "pluginConfig": {"type": "object"},
        "pluginName": {"type": "string", "minLength": 1, "maxLength": 256},
        "phase": {"enum": ["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"]},
        "priority": {"type": "integer"},
        "failStrategy": {"enum": ["FAIL_CLOSE", "FAIL_OPEN"]},
        "verificationKey": {"type": "string"},
        "type": {"enum": ["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"]},
        "match": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "mode": {"enum": ["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"]},
                    "ports": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["number"],
                            "additionalProperties": False,
                            "properties": {"number": _PORT_NUMBER},
                        },
                    },
                },
            },
        },
        "vmConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 256},
                            "value": {"type": "string", "maxLength": 2048},
                            "valueFrom": {"enum": ["INLINE", "HOST"]},
                        },
                    },
                }
            },
        },
    },
}

SERVICE_ENTRY_SPEC = {
    "type": "object",
    "required": ["hosts"],
    "additionalProperties": False,
    "properties": {
        "hosts": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "addresses": _STRING_LIST,
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["number", "name"],
                "additionalProperties": False,
                "properties": {
                    "number": _PORT_NUMBER,
                    "protocol": {"type": "string"},
                    "name": {"type": "string"},
                    "targetPort": _PORT_NUMBER,
                },
            },
        },
        "location": {"enum": ["MESH_EXTERNAL", "MESH_INTERNAL"]},
        "resolution": {"enum": ["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]},
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "address": {"type": "string"},
                    "ports": {"type": "object", "additionalProperties": _PORT_NUMBER},
                    "labels": _LABELS,
                    "network": {"type": "string"},
                    "locality": {"type": "string"},
                    "weight": {"type": "integer", "minimum": 0},
                    "serviceAccount": {"type": "string"},
                },
            },
        },
        "workloadSelector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"labels": _LABELS},
        },
        "exportTo": _STRING_LIST,
        "subjectAltNames": _STRING_LIST,
    },
}


def _object(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


# (apiVersion, kind) -> schema
SCHEMAS = {
    ("extensions.istio.io/v1alpha1", "WasmPlugin"): _object(
        "extensions.istio.io/v1alpha1", "WasmPlugin", WASM_PLUGIN_SPEC
    ),
    ("networking.istio.io/v1", "ServiceEntry"): _object(
        "networking.istio.io/v1", "ServiceEntry", SERVICE_ENTRY_SPEC
    ),
}
