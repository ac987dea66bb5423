"""Broker restarts end to end on bk-sim's own RabbitMQ node (provider ``process``).

Plays ``scenarios/broker_restart.yaml`` (one restart while leaves wait for the aggregate)
and ``scenarios/broker_restart_twice.yaml`` (one more while uploads are in flight) as
``bk-sim chaos`` does, and checks from results.json: no notification lost or handled
twice, every upload counted once, every aggregate correct, and a reconnect time for
every leaf after every restart. The shared broker on 5672 is never touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bk_sim.broker import process_available
from bk_sim.chaos import ChaosRun
from bk_sim.scenario import load_scenario
from bk_sim.sim import SimulationRun

ROOT = Path(__file__).resolve().parents[2]
_OK, _WHY = process_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _OK, reason=f"cannot start a RabbitMQ node here: {_WHY}"),
]


@pytest.mark.parametrize(("name", "restarts"), [("broker_restart", 1), ("broker_restart_twice", 2)])
def test_broker_restart_scenario_loses_nothing(tmp_path: Path, name: str, restarts: int) -> None:
    scenario = load_scenario(
        ROOT / "scenarios" / f"{name}.yaml", overrides=[f"report.dir={tmp_path}"]
    )
    assert scenario.broker.provider == "process"
    result = SimulationRun(scenario, hooks=ChaosRun(scenario)).execute()
    results = result.results
    failed = [c for c in results["checks"] if not c["passed"]]
    assert result.passed, failed
    chaos = results["chaos"]
    assert chaos["notifications"]["lost"] == 0
    assert chaos["notifications"]["duplicates"] == 0
    assert chaos["uploads"]["double_counted"] == []
    assert len(results["rounds"]) == scenario.rounds
    assert all(r["passed"] for r in results["rounds"])
    faults = [f for f in chaos["faults"] if f["kind"] == "restart_broker"]
    assert len(faults) == restarts and all(f["injected"] for f in faults)
    for fault in faults:
        assert len(fault["per_leaf"]) == scenario.leaves.count
        for leaf in fault["per_leaf"]:
            assert leaf["disconnected"], leaf
            assert leaf["reconnect_s"] is not None and 0 < leaf["reconnect_s"] < 60, leaf
    assert results["run"]["duration_s"] < 120
