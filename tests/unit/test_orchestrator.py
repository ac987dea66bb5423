"""``SimulationRun``'s checks before anything starts, and its run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bk_sim import weights
from bk_sim.engine import (
    Check,
    EventLog,
    RunCounters,
    RunEnvironment,
    read_events,
    write_json,
)
from bk_sim.errors import ScenarioError
from bk_sim.scenario import Scenario, scenario_from_dict
from bk_sim.sim import LocalProcessHost, SimulationRun
from bk_sim.sim._agent import AggregateCache


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
    second = SimulationRun(_scenario(tmp_path), run_dir=None)
    second.env.run_dir = first.run_dir
    second.env.make_run_dir("aggregates")
    assert second.run_dir == first.run_dir.with_name(first.run_dir.name + "-2")
    assert (second.run_dir / "aggregates").is_dir()
    assert (first.run_dir / "events.jsonl").read_text() == "theirs"


def test_an_explicit_run_folder_that_exists_is_refused(tmp_path: Path) -> None:
    run = SimulationRun(_scenario(tmp_path), run_dir=tmp_path)
    with pytest.raises(ScenarioError, match="the run folder already exists"):
        run.env.make_run_dir()


def test_weightings_that_overflow_are_refused_before_anything_starts(tmp_path: Path) -> None:
    sc = _scenario(
        tmp_path, leaves={"count": 2, "weighting": {"distribution": "lognormal", "sigma": 1e6}}
    )
    with pytest.raises(ScenarioError, match="leaves.weighting: lognormal draws"):
        SimulationRun(sc)
    assert list(tmp_path.iterdir()) == []


def test_results_never_hold_the_broker_passwords_of_the_scenario(tmp_path: Path) -> None:
    sc = _scenario(
        tmp_path,
        broker={
            "provider": "external",
            "amqp_url": "amqp://bob:amqp-s3cret@127.0.0.1:5672/",
            "management_url": "http://bob:mgmt-s3cret@127.0.0.1:15672/",
        },
    )
    env = RunEnvironment(sc, run_dir=tmp_path / "run")
    env.make_run_dir()
    results = env.finish([Check("c", True)], {}, interrupted=False, render=False).results
    text = json.dumps(results)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert "s3cret" not in text
    assert results["scenario"]["broker"]["amqp_url"] == "amqp://bob:***@127.0.0.1:5672/"


def test_aggregate_cache_keeps_the_first_copy_whole_and_no_partial_file(tmp_path: Path) -> None:
    keep, work = tmp_path / "aggregates", tmp_path / "leaf"
    keep.mkdir()
    work.mkdir()
    layers = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    for name in ("a.npz", "b.npz"):  # two leaves of one process download the same aggregate
        weights.save_layers(work / name, layers)
    first = AggregateCache(keep).add("agg-1", work / "a.npz")
    again = AggregateCache(keep).add("agg-1", work / "b.npz")  # another process: file exists
    np.testing.assert_array_equal(first[0], layers[0])
    np.testing.assert_array_equal(again[0], layers[0])
    assert sorted(p.name for p in keep.iterdir()) == ["agg-1.npz"]
    assert list(work.iterdir()) == []


def test_stopping_drains_what_the_orchestrator_itself_just_put(tmp_path: Path) -> None:
    """Chaos hooks emit from the orchestrator process right before the workers stop."""
    host = LocalProcessHost([])
    for i in range(300):
        host.emit({"kind": "upload", "t": float(i), "round": 1, "inferred": "x" * 200})
    log = EventLog(tmp_path / "events.jsonl")
    counters = RunCounters()

    def sink(e: dict[str, object]) -> None:
        log.write(e)
        counters.count(e)

    host.stop(sink)
    log.close()
    assert counters.uploads == 300
    assert len(list(read_events(tmp_path / "events.jsonl"))) == 300


def test_results_json_is_strict_json_even_with_infinite_errors(tmp_path: Path) -> None:
    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    data = {"rounds": [{"max_abs_error": math.inf, "max_rel_error": math.nan, "ok": 1.5}]}
    write_json(tmp_path / "results.json", data)
    back = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert back == {"rounds": [{"max_abs_error": None, "max_rel_error": None, "ok": 1.5}]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
