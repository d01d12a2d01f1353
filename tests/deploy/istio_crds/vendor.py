#!/usr/bin/env python3
"""Vendors the OpenAPI schemas of the Istio kinds meshiam ships, per Istio minor, from
Istio's own CRDs (istio/api, kubernetes/customresourcedefinitions.gen.yaml at each release
tag), into <minor>.json here: {"<apiVersion> <kind>": <openAPIV3Schema>}.

Usage: tests/deploy/istio_crds/vendor.py /path/to/istio-api-git-checkout
(e.g. `git clone https://github.com/istio/api`). Takes the newest patch tag of each minor
in MINORS. tests/deploy/test_istio_crds.py validates the rendered objects against them.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MINORS = ["1.24", "1.25", "1.26", "1.27", "1.28", "1.29", "1.30"]
KINDS = {
    ("extensions.istio.io", "WasmPlugin", "v1alpha1"),
    ("networking.istio.io", "ServiceEntry", "v1"),
    ("networking.istio.io", "DestinationRule", "v1"),
    ("networking.istio.io", "EnvoyFilter", "v1alpha3"),
}


def newest_tag(repo, minor):
    tags = subprocess.run(["git", "-C", repo, "tag", "--list", f"v{minor}.*"], capture_output=True,
                          text=True, check=True).stdout.split()
    tags = [t for t in tags if re.fullmatch(rf"v{re.escape(minor)}\.\d+", t)]
    return max(tags, key=lambda t: int(t.rsplit(".", 1)[1]))


def main(repo):
    for minor in MINORS:
        tag = newest_tag(repo, minor)
        text = subprocess.run(["git", "-C", repo, "show", f"{tag}:kubernetes/customresourcedefinitions.gen.yaml"],
                              capture_output=True, text=True, check=True).stdout
        out = {"_source": f"istio/api {tag} kubernetes/customresourcedefinitions.gen.yaml"}
        for crd in yaml.safe_load_all(text):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if (group, kind, v["name"]) in KINDS:
                    out[f"{group}/{v['name']} {kind}"] = v["schema"]["openAPIV3Schema"]
        assert len(out) == len(KINDS) + 1, f"{tag}: found {sorted(out)}"
        (HERE / f"{minor}.json").write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{minor}: {tag}")


if __name__ == "__main__":
    main(sys.argv[1])
