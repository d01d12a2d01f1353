#!/usr/bin/env python3
"""Render an Envoy config template from envoy/ by replacing ${NAME} placeholders.

Usage:
    envoy/render.py [TEMPLATE] [--set NAME=VALUE ...] [-o OUT]

TEMPLATE defaults to envoy/sidecar.yaml; output goes to stdout unless -o is given.
Every placeholder has a default (DEFAULTS below); --set overrides it. A placeholder without
a value, or a --set for a name the template does not use, is an error, so a typo never
renders silently. PLUGIN_CONFIG is the filter's JSON configuration: it is inserted as a
quoted string, so pass plain JSON.

From Python (tests):  from render import render; text = render(path, CAPTURE_PORT=15001)
"""

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEFAULTS = {
    "NODE_ID": "meshiam-sidecar",
    "POD_NAME": "myapp",
    "POD_NAMESPACE": "default",
    "ADMIN_ADDRESS": "127.0.0.1",
    "ADMIN_PORT": "15000",
    "CAPTURE_ADDRESS": "0.0.0.0",
    "CAPTURE_PORT": "15001",
    "BROKER_ADDRESS": "127.0.0.1",
    "BROKER_PORT": "8181",
    "WASM_PATH": os.path.join(ROOT, "target/wasm32-wasip1/release/meshiam_filter.wasm"),
    "PASSTHROUGH_USE_HEADER": "false",
    "PLUGIN_CONFIG": json.dumps(
        {
            "brokerCluster": "meshiam_broker",
            "brokerAuthority": "meshiam-broker",
            "allowPaths": ["meta-data/placement/region", "meta-data/placement/availability-zone"],
        },
        separators=(",", ":"),
    ),
}

# Values inserted as YAML/JSON string literals rather than verbatim.
QUOTED = {"PLUGIN_CONFIG"}

PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")


def render(template_path, **overrides):
    with open(template_path, encoding="utf-8") as f:
        text = f.read()
    used = set(PLACEHOLDER.findall(text))
    unknown = set(overrides) - used
    if unknown:
        raise KeyError(f"{os.path.basename(template_path)} has no placeholder {sorted(unknown)}")
    values = {**DEFAULTS, **{k: str(v) for k, v in overrides.items()}}

    def sub(m):
        name = m.group(1)
        if name not in values:
            raise KeyError(f"no value for ${{{name}}}")
        return json.dumps(values[name]) if name in QUOTED else values[name]

    return PLACEHOLDER.sub(sub, text)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("template", nargs="?", default=os.path.join(HERE, "sidecar.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set wants NAME=VALUE, got {item!r}")
        overrides[name] = value
    try:
        text = render(args.template, **overrides)
    except KeyError as e:
        ap.error(str(e))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
