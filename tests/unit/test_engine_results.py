"""Typed records and verdicts, and the one results.json writer every workload uses."""

from __future__ import annotations

import json
from pathlib import Path

from bk_sim.engine import Check, RoundRecord, RoundVerdict, RunEnvironment
from bk_sim.scenario import scenario_from_dict


def test_a_round_record_reads_what_the_admin_api_sends_and_tolerates_gaps() -> None:
    rec = RoundRecord.from_dict(
        {
            "round": 2,
            "status": "aggregated",
            "aggregation_id": "agg-2",
            "closed_at": "2026-01-01T00:00:00+00:00",
            "uploads": [{"leaf_id": "a", "file_id": "f1", "weighting": 3}, {"leaf_id": "b"}],
        }
    )
    assert rec.aggregated and rec.round == 2
    assert rec.uploads[0].weighting == 3.0 and rec.uploads[1].weighting is None
    assert RoundRecord.from_dict(rec.to_dict()) == rec
    open_round = RoundRecord.from_dict({"round": 3, "status": "open", "aggregation_id": None})
    assert not open_round.aggregated and open_round.uploads == ()


def test_a_round_verdict_writes_only_the_keys_it_has() -> None:
    row = RoundVerdict(1, "agg-1", "fedavg", "quorum", 8, passed=True, validation_s=0.5)
    d = row.to_dict()
    assert d["passed"] is True and d["max_abs_error"] is None and d["forensics"] is None
    for absent in ("reason", "layers", "wall_time_s", "harness_share", "validator_mb_s"):
        assert absent not in d


def test_an_interrupted_run_is_exit_2_with_a_failed_completion_check(tmp_path: Path) -> None:
    sc = scenario_from_dict(
        {
            "name": "r",
            "leaves": {"count": 1},
            "model": {"preset": "tiny"},
            "report": {"dir": str(tmp_path)},
        }
    )
    env = RunEnvironment(sc, run_dir=tmp_path / "run")
    env.make_run_dir()
    result = env.finish(
        [Check("a", True)], {"x": float("inf")}, interrupted=True, run={"role": "local"}
    )
    assert result.exit_code == 2 and not result.passed
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == result.results
    assert on_disk["x"] is None  # strict JSON: no Infinity
    assert on_disk["checks"][-1] == {
        "name": "run: completed",
        "passed": False,
        "message": "interrupted (Ctrl-C)",
    }
    assert on_disk["run"]["role"] == "local" and on_disk["run"]["interrupted"] is True
    assert on_disk["verdict"].startswith("failed: run: completed")
