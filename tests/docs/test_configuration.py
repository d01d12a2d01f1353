"""docs/configuration.md stays true to the code: every broker flag `--help` shows and every
filter plugin option the filter parses is documented there, and nothing documented is gone."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.stacklib.artifacts import BROKER_BIN as BROKER  # noqa: E402

DOC = (ROOT / "docs/configuration.md").read_text()


def broker_flags():
    out = subprocess.run([BROKER, "--help"], capture_output=True, text=True, check=True).stdout
    return {f for f in re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]+)", out, re.M)} - {"--help", "--version"}


def documented_flags():
    return set(re.findall(r"^\| `(--[a-z][a-z0-9-]+)`", DOC, re.M))


def test_every_broker_flag_is_documented_and_nothing_more():
    flags = broker_flags()
    assert len(flags) > 20
    documented = documented_flags()
    assert flags - documented == set(), "flags missing from docs/configuration.md"
    assert documented - flags == set(), "docs/configuration.md documents flags the broker lacks"


def test_every_flag_has_its_environment_name():
    help_text = subprocess.run([BROKER, "--help"], capture_output=True, text=True, check=True).stdout
    for env in re.findall(r"\[env: (MESHIAM_[A-Z_]+)", help_text):
        assert f"`{env}`" in DOC, env


def test_every_filter_option_is_documented():
    src = (ROOT / "filter/src/config.rs").read_text()
    code = src.split("#[cfg(test)]")[0]
    options = set(re.findall(r'\bf\.(?:string|number|strings|bool|object)\("([A-Za-z0-9]+)"', code))
    assert {"brokerCluster", "requireImdsv2", "allowPaths", "identity"} <= options
    documented = set(re.findall(r"^\| `([a-z][A-Za-z0-9]+)` \|", DOC, re.M))
    assert options - documented == set()
    assert documented - options == set()
