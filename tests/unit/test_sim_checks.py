"""``judge``: a finished run's checks from hand-made events, records and aggregates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bk_sim import weights
from bk_sim.engine import Judgement, RoundRecord, judge
from bk_sim.scenario import scenario_from_dict
from bk_sim.synth import leaf_update, leaf_weightings
from bk_sim.validate import reference_aggregate

N = 3
SC = scenario_from_dict(
    {"name": "checks", "seed": 11, "rounds": 1, "leaves": {"count": N}, "model": {"preset": "tiny"}}
)
W = leaf_weightings(SC.seed, SC.leaves.weighting, N)


def _events(*, done: tuple[int, ...] = tuple(range(N))) -> list[dict[str, Any]]:
    """One round played by every leaf; ``done``: the leaves that reached ``leaf_done``."""
    out: list[dict[str, Any]] = [{"kind": "leaves_spawning", "t": 1.0}]
    for i in range(N):
        lid = f"id-{i}"
        out += [
            {"kind": "leaf_started", "t": 2.0, "leaf": i, "leaf_id": lid},
            {"kind": "upload", "t": 3.0, "leaf": i, "leaf_id": lid, "round": 1,
             "file_id": f"f{i}", "weighting": float(W[i]), "bytes": 10},
            {"kind": "notification", "t": 4.0, "leaf": i, "leaf_id": lid,
             "message_type": "aggregation_status", "value": "agg-1"},
            {"kind": "aggregate_notified", "t": 4.0, "leaf": i, "leaf_id": lid, "round": 1,
             "aggregation_id": "agg-1"},
            {"kind": "download", "t": 4.5, "leaf": i, "leaf_id": lid, "round": 1,
             "aggregation_id": "agg-1", "digest": "d"},
        ]  # fmt: skip
        if i in done:
            out.append({"kind": "leaf_done", "t": 5.0, "leaf": i, "leaf_id": lid})
        else:
            out.append({"kind": "leaf_stopped", "t": 5.0, "leaf": i, "leaf_id": lid, "round": 2})
        out.append({"kind": "leaf_closed", "t": 5.1, "leaf": i, "leaf_id": lid})
    return out


def _records(uploads: range = range(N)) -> list[RoundRecord]:
    raw = [
        {
            "round": 1,
            "status": "aggregated",
            "aggregation_id": "agg-1",
            "closed_at": 3.5,
            "uploads": [
                {"leaf_id": f"id-{i}", "file_id": f"f{i}", "weighting": float(W[i])}
                for i in uploads
            ],
        }
    ]
    return [RoundRecord.from_dict(r) for r in raw]


def _write_aggregate(d: Path, layers: list[np.ndarray]) -> Path:
    d.mkdir(exist_ok=True)
    weights.save_layers(d / "agg-1.npz", layers)
    return d


def _correct(d: Path) -> Path:
    ref = reference_aggregate(
        [(float(W[i]), leaf_update(SC.seed, i, 1, None, SC.model)) for i in range(N)], "fedavg"
    )
    pairs = zip(ref, ref.dtypes, strict=True)
    layers = [x.astype(t) if t.kind == "f" else np.rint(x).astype(t) for x, t in pairs]
    return _write_aggregate(d, layers)


def _check(j: Judgement, name: str) -> Any:
    return next(c for c in j.checks if c.name == name)


def test_a_run_every_leaf_finished_passes(tmp_path: Path) -> None:
    j = judge(SC, _events(), _records(), _correct(tmp_path / "aggs"))
    assert j.passed, [c for c in j.checks if not c.passed]
    assert j.leaves["unfinished"] == []


def test_leaves_stopped_before_their_last_round_fail_the_leaves_check(tmp_path: Path) -> None:
    """The run deadline stops leaves without an error event: that is not a pass."""
    j = judge(SC, _events(done=(0,)), _records(), _correct(tmp_path / "aggs"))
    check = _check(j, "leaves: every leaf played its rounds")
    assert not check.passed and not j.passed
    assert "2 leaves stopped before their last round (leaves 1, 2)" in check.message
    assert j.leaves["unfinished"] == [1, 2]


def test_an_aggregated_round_with_no_uploads_fails_the_round_not_the_judge(
    tmp_path: Path,
) -> None:
    """A platform recording an aggregate of nothing is a failed check (exit 1), not a crash."""
    j = judge(SC, _events(), _records(uploads=range(0)), _correct(tmp_path / "aggs"))
    (row,) = j.rounds
    assert row.passed is False
    assert (row.reason or "").startswith("no reference for the uploads the platform recorded")
    assert not _check(j, "round 1: aggregate correct").passed


def test_a_wrong_aggregate_no_leaf_explains_keeps_the_comparisons_reason(tmp_path: Path) -> None:
    """One corrupted value: forensics blames no leaf, so the reason must still say what failed."""
    d = _correct(tmp_path / "aggs")
    layers = weights.read_layers(d / "agg-1.npz")
    layers[0][0, 0] += 1.0
    _write_aggregate(d, layers)
    (row,) = judge(SC, _events(), _records(), d).rounds
    assert row.passed is False
    assert row.reason is not None and row.forensics is not None
    assert row.reason.startswith("layer_0: 1 of 512 values differ by more than")
    assert row.reason.endswith(row.forensics["summary"])


def test_a_duplicate_notification_is_reported_and_a_lost_one_fails(tmp_path: Path) -> None:
    d = _correct(tmp_path / "aggs")
    twice = [*_events(), {"kind": "notification", "t": 4.2, "leaf": 1, "leaf_id": "id-1",
                          "message_type": "aggregation_status", "value": "agg-1"}]  # fmt: skip
    j = judge(SC, twice, _records(), d)
    check = _check(j, "notifications: every leaf notified of every round")
    assert check.passed and check.message == "0 lost, 1 duplicated of 3 expected"
    lost = [e for e in _events() if not (e["kind"] == "notification" and e["leaf"] == 2)]
    check = _check(
        judge(SC, lost, _records(), d), "notifications: every leaf notified of every round"
    )
    assert not check.passed and check.message == "1 lost, 0 duplicated of 3 expected"
