"""``SimulationRun``'s checks before anything starts, and its run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from bk_sim.errors import ScenarioError
from bk_sim.scenario import Scenario, scenario_from_dict
from bk_sim.sim._orchestrator import SimulationRun


def _scenario(tmp_path: Path, **extra: object) -> Scenario:
    return scenario_from_dict(
        {
            "name": "orch",
            "leaves": {"count": 2},
            "model": {"preset": "tiny"},
            "report": {"dir": str(tmp_path)},
            **extra,
        }
    )


def test_a_second_run_in_the_same_second_gets_its_own_folder(tmp_path: Path) -> None:
    first = SimulationRun(_scenario(tmp_path))
    first.run_dir.mkdir(parents=True)
    (first.run_dir / "events.jsonl").write_text("theirs")
    second = SimulationRun(_scenario(tmp_path))
    second.run_dir = first.run_dir
    second._make_run_dir()
    assert second.run_dir == first.run_dir.with_name(first.run_dir.name + "-2")
    assert (second.run_dir / "aggregates").is_dir()
    assert (first.run_dir / "events.jsonl").read_text() == "theirs"


def test_an_explicit_run_folder_that_exists_is_refused(tmp_path: Path) -> None:
    run = SimulationRun(_scenario(tmp_path), run_dir=tmp_path)
    with pytest.raises(ScenarioError, match="the run folder already exists"):
        run._make_run_dir()


def test_weightings_that_overflow_are_refused_before_anything_starts(tmp_path: Path) -> None:
    sc = _scenario(
        tmp_path, leaves={"count": 2, "weighting": {"distribution": "lognormal", "sigma": 1e6}}
    )
    with pytest.raises(ScenarioError, match="leaves.weighting: lognormal draws"):
        SimulationRun(sc)
    assert list(tmp_path.iterdir()) == []
