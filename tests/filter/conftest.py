"""Fixtures for the filter's real-Envoy tests: the release wasm, a broker stand-in, a plain
upstream, and Envoy rendered from envoy/sidecar.yaml on free loopback ports. Everything
started here is stopped at teardown."""

import json
import os

import pytest
import yaml

from meshiam_filter_harness import ENVOY_DIR, Broker, Envoy, Upstream, build_wasm, free_port, render
from render import for_direct_clients


@pytest.fixture(scope="session")
def wasm():
    return build_wasm()


@pytest.fixture
def broker():
    b = Broker()
    b.start()
    yield b
    b.stop()


@pytest.fixture
def upstream():
    u = Upstream()
    u.start()
    yield u
    u.stop()


@pytest.fixture
def start_envoy(wasm, tmp_path):
    """Starts Envoy from envoy/sidecar.yaml: start_envoy(broker, plugin=dict, **placeholders).
    The tests are clients of the listener itself, with no iptables REDIRECT: unless
    loop_guard=True (the config as rendered), render.for_direct_clients makes the listener's
    own port (Envoy.url) stand for the metadata address and a second port (Envoy.ordinary_url)
    the door for ordinary traffic, which reaches the passthrough chain."""
    started = []

    def start(broker_port, plugin=None, loop_guard=False, wasm_log="info", **overrides):
        port, admin, ordinary = free_port(), free_port(), free_port()
        values = {
            "CAPTURE_ADDRESS": "127.0.0.1",
            "CAPTURE_PORT": port,
            "ADMIN_PORT": admin,
            "BROKER_PORT": broker_port,
            "WASM_PATH": wasm,
            "PASSTHROUGH_USE_HEADER": "true",
            "POD_NAME": "myapp-7d9f",
            "POD_NAMESPACE": "default",
            "HEALTH_PORT": 0,
        }
        if plugin is not None:
            values["PLUGIN_CONFIG"] = json.dumps(plugin)
        values.update(overrides)
        n = len(started)
        config = tmp_path / f"envoy-{n}.yaml"
        text = render(os.path.join(ENVOY_DIR, "sidecar.yaml"), **values)
        if not loop_guard:
            text = yaml.safe_dump(for_direct_clients(yaml.safe_load(text), ordinary), sort_keys=False)
        config.write_text(text)
        log = str(tmp_path / f"envoy-{n}.log")
        e = Envoy(str(config), int(values["CAPTURE_PORT"]), int(values["ADMIN_PORT"]), log,
                  ordinary_port=None if loop_guard else ordinary, wasm_log=wasm_log)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()
