#!/usr/bin/env python3
"""Render an Envoy config template from envoy/ by replacing ${NAME} placeholders.

Usage:
    envoy/render.py [TEMPLATE] [--set NAME=VALUE ...] [-o OUT]

TEMPLATE defaults to envoy/sidecar.yaml; output goes to stdout unless -o is given.
Every placeholder has a default (DEFAULTS below); --set overrides it. A placeholder without
a value, or a --set for a name the template does not use, is an error, so a typo never
renders silently. PLUGIN_CONFIG is the filter's JSON configuration: it is inserted as a
quoted string, so pass plain JSON. POD_IPS is the pod's addresses, comma-separated (or one
@MARKER@ filled in per pod later); POD_IP_RANGES is derived from it, never set.

From Python (tests):  from render import render; text = render(path, CAPTURE_PORT=15001)
"""

import argparse
import copy
import ipaddress
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
    "CAPTURE_ADDRESS": "127.0.0.1",
    "CAPTURE_PORT": "15001",
    # The kubelet's probe port (as Istio's 15021); 0 picks a free one (several Envoys on one host).
    "HEALTH_ADDRESS": "0.0.0.0",
    "HEALTH_PORT": "15021",
    "BROKER_ADDRESS": "127.0.0.1",
    "BROKER_PORT": "8181",
    "WASM_PATH": os.path.join(ROOT, "target/wasm32-wasip1/release/meshiam_filter.wasm"),
    "PASSTHROUGH_USE_HEADER": "false",
    # None known: the sidecar answers metadata to loopback connections only.
    "POD_IPS": "",
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
MARKER = re.compile(r"@([A-Z0-9_]+)@")


def pod_ip_ranges(pod_ips):
    """POD_IPS ("10.0.0.5,fd00::5") as entries continuing a YAML flow list of CIDR ranges
    (", { address_prefix: ..., prefix_len: 32 }" each). A marker "@NAME@" instead of addresses
    becomes "@NAME_RANGES@", for the pod's init container to replace with such entries."""
    items = [i.strip() for i in pod_ips.split(",") if i.strip()]
    if len(items) == 1 and MARKER.fullmatch(items[0]):
        return f"@{MARKER.fullmatch(items[0]).group(1)}_RANGES@"
    out = []
    for item in items:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise KeyError(f"POD_IPS entry {item!r} is not an IP address (or one @MARKER@)") from None
        out.append(f', {{ address_prefix: "{ip}", prefix_len: {ip.max_prefixlen} }}')
    return "".join(out)


def render(template_path, **overrides):
    with open(template_path, encoding="utf-8") as f:
        text = f.read()
    used = set(PLACEHOLDER.findall(text))
    unknown = set(overrides) - used
    if unknown:
        raise KeyError(f"{os.path.basename(template_path)} has no placeholder {sorted(unknown)}")
    if "POD_IP_RANGES" in overrides:
        raise KeyError("POD_IP_RANGES is derived from POD_IPS; set POD_IPS")
    values = {**DEFAULTS, **{k: str(v) for k, v in overrides.items()}}
    values["POD_IP_RANGES"] = pod_ip_ranges(values["POD_IPS"])

    def sub(m):
        name = m.group(1)
        if name not in values:
            raise KeyError(f"no value for ${{{name}}}")
        return json.dumps(values[name]) if name in QUOTED else values[name]

    return PLACEHOLDER.sub(sub, text)


def without_loop_guard(doc):
    """For setups whose clients connect to the capture listener directly (loopback tests,
    benchmarks, the stack's loopback mode), never for a pod: drops the `loop_guard` chain of a
    rendered sidecar.yaml (loaded as YAML), which closes every connection to the listener's
    own port. Returns the doc."""
    for listener in doc["static_resources"]["listeners"]:
        listener["filter_chains"] = [c for c in listener["filter_chains"] if c.get("name") != "loop_guard"]
    return doc


def for_direct_clients(doc, ordinary_port):
    """For setups whose clients connect to the capture listener directly, with no iptables
    REDIRECT and so no original destination (loopback tests, benchmarks, the stack's loopback
    mode; never a pod), in a rendered sidecar.yaml (loaded as YAML): a connection to the
    listener's own port stands for one to a metadata address (chain `direct_metadata`, a copy
    of the `metadata` chain matched on that port, with the same source rule, in place of the
    loop guard), and a second port of the listener, `ordinary_port`, on the same address, is
    the door for ordinary traffic, which reaches the `passthrough` chain as redirected
    ordinary traffic does. Returns the doc."""
    for listener in doc["static_resources"]["listeners"]:
        chains = listener["filter_chains"]
        metadata = next((c for c in chains if c.get("name") == "metadata"), None)
        if metadata is None:
            continue
        port = listener["address"]["socket_address"]["port_value"]
        direct = copy.deepcopy(metadata)
        direct["name"] = "direct_metadata"
        direct["filter_chain_match"].pop("prefix_ranges", None)
        direct["filter_chain_match"]["destination_port"] = int(port)
        listener["filter_chains"] = [direct] + [c for c in chains if c.get("name") != "loop_guard"]
        address = dict(listener["address"]["socket_address"], port_value=int(ordinary_port))
        listener.setdefault("additional_addresses", []).append({"address": {"socket_address": address}})
    return doc


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
