"""The CI cut of the soak (``scenarios/soak_short.yaml``, about 2 minutes): two cycles of
every fault kind (connection kills, channel closes, a blackhole longer than the heartbeat,
a restart of bk-sim's own broker node, HTTP 503s, a leaf process and the platform
SIGKILLed and restarted), judged like the 30-minute soak: nothing lost, nothing counted
twice, every aggregate correct."""

from __future__ import annotations

from collections import Counter
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


def test_soak_cut_survives_every_fault_kind(tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "soak_short.yaml", [f"report.dir={tmp_path}"])
    result = SimulationRun(scenario, hooks=ChaosRun(scenario)).execute()
    results = result.results
    assert result.passed, [c for c in results["checks"] if not c["passed"]]
    chaos = results["chaos"]
    injected = Counter(f["kind"] for f in chaos["faults"] if f["injected"])
    assert injected == Counter(f.kind for f in scenario.chaos.faults)
    assert set(injected) >= {
        "kill_connections",
        "close_channel",
        "blackhole",
        "restart_broker",
        "http",
        "kill_leaf",
        "kill_platform",
    }
    assert chaos["notifications"]["lost"] == 0
    assert chaos["notifications"]["duplicates"] == 0
    assert chaos["uploads"]["double_counted"] == []
    assert all(r["passed"] for r in results["rounds"])
