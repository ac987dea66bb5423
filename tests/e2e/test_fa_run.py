"""``bk-sim run`` of federated-analytics scenarios, end to end through the CLI.

Real runs: leaf processes upload their sites' FA archives to the reference platform (or
to a platform the test starts, in remote mode), and the run judges every round. WebSocket
notifications, no broker. The fault runs are smoke-sized (4 leaves, 1 round): one run per
analytics fault.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bk_sim.scenario import load_scenario
from bk_sim.synth import field_ops, tabular_spec
from tests.conftest import PlatformFactory

ROOT = Path(__file__).resolve().parents[2]
FA_SMOKE = ROOT / "scenarios" / "fa_smoke.yaml"
#: smoke-sized fault runs: every leaf in one process, one round
SMALL = ("leaves.count=4", "leaves.processes=1", "rounds=1")

pytestmark = [pytest.mark.slow]


def _run(
    tmp_path: Path, *overrides: str, timeout: float = 180
) -> tuple[subprocess.CompletedProcess[str], Path]:
    reports = tmp_path / "reports"
    args = [sys.executable, "-m", "bk_sim.cli", "run", str(FA_SMOKE)]
    for o in (f"report.dir={reports}", *overrides):
        args += ["--set", o]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=dict(os.environ)
    )
    runs = sorted(reports.glob("*/results.json")) if reports.exists() else []
    assert runs, proc.stdout + proc.stderr
    return proc, runs[-1].parent


def _results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def _leaf_index(run_dir: Path, leaf_id: str) -> int:
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("leaf_id") == leaf_id and "leaf" in e:
            return int(e["leaf"])
    raise AssertionError(f"leaf {leaf_id} is in no event")


def _junit_cases(run_dir: Path) -> dict[str, bool]:
    """junit.xml's cases: name -> passed."""
    root = ET.parse(run_dir / "junit.xml").getroot()
    return {c.get("name", ""): c.find("failure") is None for c in root.iter("testcase")}


def test_fa_smoke_passes_and_reports_every_round(tmp_path: Path) -> None:
    proc, run_dir = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("PASSED")
    results = _results(run_dir)
    analytics = results["analytics"]
    assert [a["round"] for a in analytics] == [1, 2]
    for a in analytics:
        assert a["passed"] and a["uploads"] == 8
        assert a["derived_checked"] is True  # the local platform's records carry them
        assert a["verdict"]["passed"] and a["verdict"]["checks"] > 100
        assert a["verdict"]["findings"] == []
        hist = a["histograms"]
        assert len(hist) == 6  # one per column
        assert all(len(h["sites"]) == 8 for h in hist.values())
        assert all(sum(h["pooled"]) > 0 for h in hist.values())
    assert {r["strategy"] for r in results["rounds"]} == {"field_ops"}
    uploads = [
        json.loads(line)
        for line in (run_dir / "events.jsonl").read_text().splitlines()
        if '"upload"' in line
    ]
    uploads = [e for e in uploads if e["kind"] == "upload"]
    assert len(uploads) == 16
    assert {e["payload_kind"] for e in uploads} == {"federated_analytics"}
    cases = _junit_cases(run_dir)
    assert cases["round 1: analytics correct"] and cases["round 2: analytics correct"]
    page = (run_dir / "report.html").read_text()
    assert "Analytics rounds" in page and "c00_float" in page and "<svg" in page


@pytest.mark.parametrize("fault", ["mean_of_means", "drop_leaf", "nan_poisoned", "double_count"])
def test_each_analytics_fault_fails_the_run_with_forensics_first(
    tmp_path: Path, fault: str
) -> None:
    proc, run_dir = _run(tmp_path, *SMALL, f"platform.faults.analytics={fault}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    results = _results(run_dir)
    (a,) = results["analytics"]
    assert a["passed"] is False
    victim = a["platform_fault"]
    assert victim["analytics"] == fault
    (check,) = [c for c in results["checks"] if c["name"] == "round 1: analytics correct"]
    message = check["message"]
    if fault in ("drop_leaf", "double_count"):
        leaf_id = victim["victim_leaf_id"]
        what = "is missing from" if fault == "drop_leaf" else "is counted twice"
        assert message.startswith(f"leaf {_leaf_index(run_dir, leaf_id)} ({leaf_id})'s upload")
        assert what in message.split(".")[0]
    elif fault == "nan_poisoned":
        assert message.startswith(f"field '{victim['victim_field']}' is nan")
    else:
        assert message.startswith("column '")
        assert "mean of the 4 per-site means" in message.split(";")[0]
    # The forensics lead the verdict line, the round's row, junit and the report.
    lead = message[:60]
    assert lead in proc.stdout.splitlines()[0]
    assert _junit_cases(run_dir)["round 1: analytics correct"] is False
    findings = a["verdict"]["findings"]
    assert findings and {f["check"] for f in findings} & {
        "leaf_missing",
        "leaf_counted_twice",
        "non_finite",
        "mean_of_means",
    }


def test_remote_platform_from_a_credentials_file(
    tmp_path: Path, platform_factory: PlatformFactory
) -> None:
    """platform.mode remote: with the admin API the derived statistics are judged too;
    without it the rounds come from the run's own events, and a fault set on the
    deployment is still caught with the leaf named."""
    handle = platform_factory(no_amqp=True)
    ops = field_ops(tabular_spec(load_scenario(FA_SMOKE)))
    admin = handle.admin
    tree = admin.create_tree("fa-remote")
    try:

        def branch(name: str) -> tuple[str, Path]:
            branch_id = str(admin.create_branch(tree, name, field_ops=ops)["branch_id"])
            creds = admin.create_leaves(branch_id, 4)
            admin.set_run_status(branch_id, "start")
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(creds))
            return branch_id, path

        remote = ("platform.mode=remote", f"platform.host={handle.url}", *SMALL)
        _, creds = branch("with-admin")
        proc, run_dir = _run(
            tmp_path,
            *remote,
            f"platform.credentials_file={creds}",
            f"platform.admin_url={handle.url}",
            f"platform.admin_token={handle.admin_token}",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (a,) = _results(run_dir)["analytics"]
        assert a["passed"] and a["derived_checked"] is True
        assert handle.admin_token not in (run_dir / "results.json").read_text()

        branch_id, creds = branch("no-admin")
        admin.set_faults(branch_id, {"analytics": "drop_leaf"})
        proc, run_dir = _run(tmp_path, *remote, f"platform.credentials_file={creds}")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (a,) = _results(run_dir)["analytics"]
        assert a["derived_checked"] is False  # no round records without the admin API
        victim = admin.rounds(branch_id)[0]["fault"]["victim_leaf_id"]
        assert f"({victim})'s upload is missing from the aggregate" in proc.stdout.splitlines()[0]
    finally:
        admin.delete_tree(tree)
