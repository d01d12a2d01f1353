"""tests/stack's Envoy sidecars: the filter's plugin config, envoy/sidecar.yaml rendered for
a pod (and adapted for loopback mode), and starting a pod's Envoy."""
import json
import sys

import yaml

from tests.stacklib.procs import free_port, http_ok, spawn, wait_until
from tests.stacklib.state import (ENVOY_ADMIN, ENVOY_LISTEN, ENVOY_UID, ROOT, STATE_DIR, VENV, WASM, StackError,
                                  families, node_addr, port)


def plugin_config(state, entry):
    """The filter's plugin config for a pod's sidecar, with --filter-option overrides."""
    cfg = {
        "brokerCluster": "meshiam_broker",
        "brokerAuthority": "meshiam-broker",
        "allowPaths": ["meta-data/placement/region", "meta-data/placement/availability-zone"],
        "identity": {"source": "nodeMetadata"},
    }
    if state["mode"] == "loopback":
        # No iptables capture: the pod addresses its sidecar directly, so the sidecar's own
        # listener address is this pod's metadata address.
        cfg["metadataAddresses"] = ["169.254.169.254:80", "[fd00:ec2::254]:80", f"127.0.0.1:{entry['port']}"]
    for item in state.get("filter_options", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise StackError(f"--filter-option wants KEY=JSON, got {item!r}")
        try:
            cfg[key] = json.loads(value)
        except ValueError:
            cfg[key] = value
    return cfg


def render_envoy(state, entry):
    sys.path.insert(0, str(ROOT / "envoy"))
    from render import for_direct_clients, render  # envoy/render.py

    spec = entry["spec"]
    loop = state["mode"] == "loopback"
    values = {
        "NODE_ID": f"sidecar~{entry['ip']}~{spec['name']}.{spec['namespace']}",
        "POD_NAME": spec["name"],
        "POD_NAMESPACE": spec["namespace"],
        "ADMIN_ADDRESS": "127.0.0.1",
        "ADMIN_PORT": entry["admin_port"] if loop else ENVOY_ADMIN,
        # Loopback in both modes: the REDIRECT lands on 127.0.0.1; nothing outside the pod
        # reaches the listener.
        "CAPTURE_ADDRESS": "127.0.0.1",
        "CAPTURE_PORT": entry["port"] if loop else ENVOY_LISTEN,
        # The kubelet's probe listener: any free port when all pods share loopback.
        "HEALTH_PORT": 0 if loop else 15021,
        # The sources besides loopback the sidecar answers metadata to.
        "POD_IPS": ",".join(spec["ips"]),
        # Over IPv4 when the pod has an IPv4 address, else over IPv6 (the broker listens on
        # both): its source address is one of the pod's either way.
        "BROKER_ADDRESS": node_addr(state, 4 if 4 in families(spec["ips"]) else 6),
        "BROKER_PORT": port(state, "broker"),
        "WASM_PATH": WASM,
        "PLUGIN_CONFIG": json.dumps(plugin_config(state, entry), separators=(",", ":")),
    }
    if state.get("mtls", "off") != "off":
        from tests.stacklib.meshca import pod_dir
        values["BROKER_CERT_DIR"] = str(pod_dir(entry))
    text = render(str(ROOT / "envoy/sidecar.yaml"), **values)
    if loop:
        # The broker knows a pod by its address: on loopback each sidecar calls it from the
        # pod's own 127.1.0.x. And the pods call their sidecar's listener directly, with no
        # original destination: its port stands for the metadata address (and a second,
        # unused port is the listener's door for ordinary traffic), in place of the loop guard.
        doc = for_direct_clients(yaml.safe_load(text), free_port())
        for c in doc["static_resources"]["clusters"]:
            if c["name"] == "meshiam_broker":
                c["upstream_bind_config"] = {"source_address": {"address": entry["ip"], "port_value": 0}}
        text = yaml.safe_dump(doc, sort_keys=False)
    out = STATE_DIR / "envoy" / f"{entry['index']}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def envoy_name(entry):
    return f"envoy-{entry['spec']['namespace']}-{entry['spec']['name']}"


def start_envoy(state, key):
    entry = state["pods"][key]
    cfg = render_envoy(state, entry)
    name = envoy_name(entry)
    argv = [VENV / "bin/envoy", "-c", cfg, "--disable-hot-restart", "--log-level", "warning",
            "--concurrency", "2"]
    if state["mode"] == "netns":
        spawn(state, name, argv, netns=entry["netns"], uid=ENVOY_UID)
        admin = f"http://127.0.0.1:{ENVOY_ADMIN}/ready"
        wait_until(f"Envoy of {key}", lambda: http_ok(state, entry["netns"], admin), timeout=30)
    else:
        spawn(state, name, argv)
        admin = f"http://127.0.0.1:{entry['admin_port']}/ready"
        wait_until(f"Envoy of {key}", lambda: http_ok(state, None, admin), timeout=30)
