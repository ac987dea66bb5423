"""TLS end to end as a user runs it: ``bk-sim run scenarios/tls_smoke.yaml`` and
``bk-sim chaos scenarios/tls_chaos.yaml`` (HTTPS, AMQPS through the chaos proxy, a broker
restart, connection kills and a blackhole), every leaf verifying the run's CA."""

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


@pytest.mark.parametrize("name", ["tls_smoke", "tls_chaos"])
def test_tls_scenario_passes(tmp_path: Path, name: str) -> None:
    scenario = load_scenario(ROOT / "scenarios" / f"{name}.yaml", [f"report.dir={tmp_path}"])
    assert scenario.platform.tls
    hooks = ChaosRun(scenario) if scenario.chaos.faults else None
    result = SimulationRun(scenario, hooks=hooks).execute()
    assert result.passed, [c for c in result.results["checks"] if not c["passed"]]
    assert (result.run_dir / "tls" / "ca.pem").exists()
    assert result.results["scenario"]["platform"]["tls"] is True
    events = (result.run_dir / "events.jsonl").read_text()
    assert "AMQPS on" in events or '"broker": "process"' in events
