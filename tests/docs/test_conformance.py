"""docs/conformance.md is backed by tests: every row names a test that exists (`file::name`:
the file has `def name(`), or is marked `pending: <branch>` while that branch writes it — and
a pending row whose file has appeared must be made to name its test. The README links it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs/conformance.md"
DOORS = {"IMDS via the sidecar", "IMDS direct to the broker", "Container endpoint"}


def rows():
    out = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in DOORS:
            out.append(cells)
    return out


def test_the_table_covers_every_door_and_client():
    table = rows()
    assert {r[0] for r in table} == DOORS
    clients = {r[1] for r in table}
    assert {"boto3", "AWS CLI", "aws-sdk-rust"} <= clients
    # Both address families for the IMDS door.
    assert any("IPv4" in r[2] for r in table) and any("IPv6" in r[2] for r in table)


def test_every_row_names_a_test_that_exists():
    pending = []
    for door, client, address, _env, test, status in rows():
        m = re.fullmatch(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", test)
        assert m, f"{door} / {client} / {address}: test cell {test!r} is not `tests/….py::name`"
        path, name = ROOT / m.group(1), m.group(2)
        if status == "tested":
            assert name, f"{door} / {client}: a tested row names its test function"
            assert path.exists(), f"{door} / {client}: {m.group(1)} does not exist"
            assert re.search(rf"^def {name}\(", path.read_text(), re.M), \
                f"{door} / {client}: no test {name} in {m.group(1)}"
        else:
            assert re.fullmatch(r"pending: [\w.-]+", status), f"{door} / {client}: status {status!r}"
            assert not path.exists(), \
                f"{door} / {client}: {m.group(1)} exists now: name its test and mark the row tested"
            pending.append(f"{door} / {client} / {address}: {m.group(1)} ({status})")
    if pending:
        print("pending rows:\n  " + "\n  ".join(pending))


def test_readme_links_the_table():
    assert "docs/conformance.md" in (ROOT / "README.md").read_text()
