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
CAPTURE_ADDRESS_V6 and HEALTH_ADDRESS_V6 are the listeners' IPv6 addresses (empty: none);
CAPTURE_ADDITIONAL_ADDRESSES and HEALTH_ADDITIONAL_ADDRESSES are derived from them.

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
    # Where an ip6tables REDIRECT lands (IPv6 metadata addresses); empty: no IPv6 listener
    # (a pod whose kernel has IPv6 disabled has no ::1 to bind).
    "CAPTURE_ADDRESS_V6": "::1",
    # The kubelet's probe port (as Istio's 15021); 0 picks a free one (several Envoys on one host).
    "HEALTH_ADDRESS": "0.0.0.0",
    "HEALTH_PORT": "15021",
    # The kubelet probes a pod's first address, IPv6 in IPv6-first clusters; empty: none.
    "HEALTH_ADDRESS_V6": "::",
    "BROKER_ADDRESS": "127.0.0.1",
    "BROKER_PORT": "8181",
    "WASM_PATH": os.path.join(ROOT, "target/wasm32-wasip1/release/meshiam_filter.wasm"),
    "PASSTHROUGH_USE_HEADER": "false",
    # None known: the sidecar answers metadata to loopback connections only.
    "POD_IPS": "",
    # Empty: plain HTTP to the broker (its --mtls off). A directory: the call-out presents the
    # pod's workload certificate from there (see broker_tls below).
    "BROKER_CERT_DIR": "",
    # The SPIFFE ID the broker's certificate must carry when BROKER_CERT_DIR is set.
    "BROKER_IDENTITY": "spiffe://cluster.local/ns/meshiam-system/sa/meshiam-broker",
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

# Settable names that are no placeholder themselves: derived placeholders are made of them.
INPUTS = {"CAPTURE_ADDRESS_V6": "CAPTURE_ADDITIONAL_ADDRESSES", "HEALTH_ADDRESS_V6": "HEALTH_ADDITIONAL_ADDRESSES",
          "BROKER_CERT_DIR": "BROKER_TLS", "BROKER_IDENTITY": "BROKER_TLS"}
DERIVED = {"POD_IP_RANGES", *INPUTS.values()}

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


def additional_addresses(address, port):
    """A listener's `additional_addresses` (a YAML flow list): [address]:port, or none when
    address is empty."""
    if not address:
        return "[]"
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise KeyError(f"{address!r} is not an IPv6 address") from None
    return f'[{{ address: {{ socket_address: {{ address: "{address}", port_value: {port} }} }} }}]'


# The files a BROKER_CERT_DIR holds. The certificate files are what Istio's agent writes with
# OUTPUT_CERTS; the two SDS files (sds_files() below) point Envoy at them.
CERT_FILES = ("cert-chain.pem", "key.pem", "root-cert.pem")


def sds_files(cert_dir):
    """The file-based SDS resources for a BROKER_CERT_DIR, as {file name: YAML text}: the
    workload certificate and the mesh root. Envoy watches cert_dir and reloads both when an
    entry is moved into it, so a writer that swaps a `..data` symlink (as the kubelet does for
    mounted volumes) or renames new files into place rotates them without a restart."""
    def res(name, body):
        return json.dumps({"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": name, **body}]}, indent=1) + "\n"
    return {
        "sds-workload.yaml": res("workload", {"tls_certificate": {
            "certificate_chain": {"filename": os.path.join(cert_dir, "cert-chain.pem")},
            "private_key": {"filename": os.path.join(cert_dir, "key.pem")},
            "watched_directory": {"path": cert_dir}}}),
        "sds-root.yaml": res("mesh-root", {"validation_context": {
            "trusted_ca": {"filename": os.path.join(cert_dir, "root-cert.pem")},
            "watched_directory": {"path": cert_dir}}}),
    }


def broker_tls(cert_dir, identity):
    """The meshiam_broker cluster's transport_socket line (one YAML flow mapping), or a comment
    for plain HTTP: TLS presenting the pod's workload certificate, verifying the broker's
    certificate against the mesh root and its SPIFFE ID."""
    if not cert_dir:
        return "# (BROKER_CERT_DIR unset: plain HTTP)"
    def sds(name, file):
        return {"name": name, "sds_config": {"path_config_source": {
            "path": os.path.join(cert_dir, file), "watched_directory": {"path": cert_dir}}}}
    sock = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds("workload", "sds-workload.yaml")],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": identity}}]},
                "validation_context_sds_secret_config": sds("mesh-root", "sds-root.yaml")}}}}
    return "transport_socket: " + json.dumps(sock, separators=(",", ":"))


def render(template_path, **overrides):
    with open(template_path, encoding="utf-8") as f:
        text = f.read()
    used = set(PLACEHOLDER.findall(text))
    unknown = set(overrides) - used - {k for k, v in INPUTS.items() if v in used}
    if unknown:
        raise KeyError(f"{os.path.basename(template_path)} has no placeholder {sorted(unknown)}")
    derived = set(overrides) & DERIVED
    if derived:
        raise KeyError(f"{sorted(derived)} are derived (from POD_IPS, CAPTURE_ADDRESS_V6, HEALTH_ADDRESS_V6, BROKER_CERT_DIR): "
                       "set those")
    values = {**DEFAULTS, **{k: str(v) for k, v in overrides.items()}}
    values["POD_IP_RANGES"] = pod_ip_ranges(values["POD_IPS"])
    values["CAPTURE_ADDITIONAL_ADDRESSES"] = additional_addresses(values["CAPTURE_ADDRESS_V6"], values["CAPTURE_PORT"])
    values["HEALTH_ADDITIONAL_ADDRESSES"] = additional_addresses(values["HEALTH_ADDRESS_V6"], values["HEALTH_PORT"])
    values["BROKER_TLS"] = broker_tls(values["BROKER_CERT_DIR"], values["BROKER_IDENTITY"])

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
