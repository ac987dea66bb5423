"""Memory bounded by one model (issue 17), end to end at a CI-friendly size.

An 8M-parameter model (32 MB per upload) through the real platform, RabbitMQ and leaf
processes; the bound is asserted from the run's own results.json: every process's peak
RSS minus its at-rest RSS is at most 3 x S (k x 3 x S for a leaf process hosting k
leaves), and the run's own memory check says the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bk_sim.scenario import scenario_from_dict
from bk_sim.sim import SimulationRun

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_every_process_stays_within_three_models(tmp_path: Path) -> None:
    scenario = scenario_from_dict(
        {
            "name": "memory_bound",
            "seed": 5,
            "platform": {"mode": "local", "strategy": "fedavg"},
            "leaves": {
                "count": 4,
                "processes": 2,
                "weighting": {"distribution": "uniform", "low": 1.0, "high": 10.0},
            },
            "model": {
                "layers": [
                    {"shape": [2000, 4000], "dtype": "float32"},
                    {"shape": [4000], "dtype": "float32"},
                ]
            },
            "payload": {"compression": "fast"},
            "rounds": 2,
            "timeouts": {"notification_s": 120, "run_s": 300},
            "report": {"dir": str(tmp_path / "reports")},
        }
    )
    result = SimulationRun(scenario).execute()
    assert result.run_dir is not None
    doc: dict[str, Any] = json.loads((result.run_dir / "results.json").read_text())
    failed = [c for c in doc["checks"] if not c["passed"]]
    assert not failed, failed
    memory = doc["memory"]
    s = memory["S_bytes"]
    assert s == 8_004_000 * 4 and memory["checked"] is True
    kinds = {p["kind"] for p in memory["processes"]}
    assert {"orchestrator", "platform", "leaves"} <= kinds
    leaf_processes = [p for p in memory["processes"] if p["kind"] == "leaves"]
    assert len(leaf_processes) == 2 and all(p["leaves"] == 2 for p in leaf_processes)
    for p in memory["processes"]:
        if p["kind"] not in ("orchestrator", "platform", "leaves"):
            continue
        growth = p["peak_bytes"] - p["at_rest_bytes"]
        assert growth <= 3 * max(1, p["leaves"]) * s, p["name"]
        assert len(p["timeline"]) >= 2, p["name"]
    names = [c["name"] for c in doc["checks"]]
    assert "memory: every process within 3 x S of one model" in names
    assert "Memory per process" in (result.run_dir / "report.html").read_text()
