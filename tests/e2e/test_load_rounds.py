"""``bk-sim load`` judges every aggregate it caused: real Locust, platform and RabbitMQ.

The load's rounds are checked like a simulation's (float64 reference of the uploads the
platform recorded, named by the known payload variants), so an aggregation bug injected
on the platform fails the load with the round and its forensics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scenarios" / "load_smoke.yaml"

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def _load(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    data = yaml.safe_load(SMOKE.read_text())
    data["load"]["duration_s"] = 5
    data["report"] = {"dir": str(tmp_path / "reports")}
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "bk_sim.cli", "load", str(scenario), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    runs = sorted((tmp_path / "reports").glob("*/results.json"))
    assert runs, f"no results.json written: {proc.stdout}{proc.stderr}"
    results = json.loads(runs[-1].read_text())
    results["_dir"] = str(runs[-1].parent)
    return proc, results


def test_every_aggregate_of_a_clean_load_matches_the_reference(
    management: Any, tmp_path: Path
) -> None:
    proc, results = _load(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rounds = results["rounds"]
    assert rounds, "no round judged"
    assert all(r["passed"] for r in rounds), rounds
    assert results["rounds_summary"]["judged"] == len(rounds)
    assert sum(r["uploads"] for r in rounds) > 0
    names = [c["name"] for c in results["checks"]]
    assert sum(n.endswith(": aggregate correct") for n in names) == len(rounds)


def test_an_aggregation_bug_under_load_fails_with_the_round_and_its_forensics(
    management: Any, tmp_path: Path
) -> None:
    proc, results = _load(tmp_path, "--set", "platform.faults.aggregation=drop_leaf")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [r for r in results["rounds"] if not r["passed"]]
    assert failed, results["rounds"]
    for r in failed:
        assert r["forensics"] is not None
        # a dropped upload is named: by leaf when its bytes were unique in the round,
        # by payload variant when another leaf uploaded the same bytes
        assert "dropped" in r["reason"], r["reason"]
    assert "aggregate correct" in proc.stdout + proc.stderr
    report = (Path(results["_dir"]) / "report.html").read_text()
    assert f"round {failed[0]['round']}" in report and "dropped" in report
