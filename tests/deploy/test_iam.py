"""The AWS IAM documents of the example parse and say what they should."""

import json

from conftest import MANIFESTS

AWS = MANIFESTS / "aws"
NODE_ROLE = "arn:aws:iam::12345678912:role/kube-1-worker"
APP_ROLE = "arn:aws:iam::12345678912:role/myapp-iam-role"


def _load(name):
    doc = json.loads((AWS / name).read_text())
    assert doc["Version"] == "2012-10-17"
    for s in doc["Statement"]:
        assert s["Effect"] == "Allow"
        assert "NotAction" not in s and "NotResource" not in s and "NotPrincipal" not in s
    return doc


def _actions(statement):
    a = statement["Action"]
    return [a] if isinstance(a, str) else a


def test_app_role_trusts_only_the_node_role():
    doc = _load("myapp-iam-role.trust-policy.json")
    principals = {s["Principal"]["AWS"] for s in doc["Statement"]}
    assert principals == {NODE_ROLE}
    actions = {a for s in doc["Statement"] for a in _actions(s)}
    assert "sts:AssumeRole" in actions
    assert actions <= {"sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"}


def test_node_role_may_assume_only_app_roles():
    doc = _load("kube-1-worker.assume-app-roles.policy.json")
    assume = [s for s in doc["Statement"] if "sts:AssumeRole" in _actions(s)]
    assert assume and all(s["Resource"] == [APP_ROLE] for s in assume)
    for s in doc["Statement"]:
        assert "*" not in json.dumps(s["Resource"]), "no wildcard resources"
        assert set(_actions(s)) <= {"sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"}
        assert "Principal" not in s  # an identity policy, not a trust policy
