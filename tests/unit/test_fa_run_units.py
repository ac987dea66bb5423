"""The run's analytics pieces without processes: one FA round judged from a round record
and an aggregate file (combined by the platform's own code), the failure message's order,
the typed round record, and the report's analytics section."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bk_sim.engine import RecordedUpload, RoundRecord
from bk_sim.engine._fa_checks import failure_message, judge_analytics_round
from bk_sim.platform._analytics import (
    FEDERATED_ANALYTICS,
    PAYLOAD_KIND_KEY,
    FieldsInfo,
    FieldSpec,
    combine,
    derived_stats,
    freeze_schema,
)
from bk_sim.report import summary_lines
from bk_sim.report._fa_section import analytics_section, plotted_rounds
from bk_sim.scenario import Scenario, load_scenario
from bk_sim.synth import field_ops, site_payload, tabular_spec
from bk_sim.validate import AnalyticsFinding, AnalyticsJudgement

ROOT = Path(__file__).resolve().parents[2]
SITES = 3


@dataclass
class _Up:
    leaf: int
    leaf_id: str
    round: int


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario(ROOT / "scenarios" / "fa_smoke.yaml", [f"leaves.count={SITES}"])


def _aggregate(
    sc: Scenario, tmp_path: Path, leaf_round: int, fault: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The platform's combination of the sites' uploads of ``leaf_round``, as a file."""
    spec = tabular_spec(sc)
    payloads = [(f"id-{i}", site_payload(spec, i, leaf_round)) for i in range(SITES)]
    first = payloads[0][1]
    info = FieldsInfo({k: FieldSpec(v.dtype.str, v.shape) for k, v in first.items()}, first)
    combined = combine(payloads, freeze_schema(info, field_ops(spec)), fault)
    arrays = {**combined.fields, PAYLOAD_KIND_KEY: np.array(FEDERATED_ANALYTICS)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = tmp_path / "agg.npz"
    path.write_bytes(buf.getvalue())
    return path, {"derived": derived_stats(arrays)}


def _record(analytics: dict[str, Any] | None, *, status: str = "aggregated") -> RoundRecord:
    return RoundRecord(
        round=5,  # the platform's numbering need not be the leaves' rounds
        status=status,
        aggregation_id="agg",
        uploads=tuple(RecordedUpload(f"id-{i}", f"file-{i}", 0.0) for i in range(SITES)),
        kind="federated_analytics",
        analytics=analytics,
    )


def _uploads(leaf_round: int) -> dict[str, _Up]:
    return {f"file-{i}": _Up(i, f"id-{i}", leaf_round) for i in range(SITES)}


def test_a_round_is_judged_from_the_sites_of_the_leaves_own_rounds(
    scenario: Scenario, tmp_path: Path
) -> None:
    path, analytics = _aggregate(scenario, tmp_path, leaf_round=2)
    row, section = judge_analytics_round(scenario, _record(analytics), _uploads(2), lambda _: path)
    assert row.passed, row.reason
    assert row.strategy == "field_ops" and section["derived_checked"] is True
    assert sorted(section["histograms"]) == sorted(section["verdict"]["pooled"])
    assert all(len(h["sites"]) == SITES for h in section["histograms"].values())
    # The same aggregate judged as if the leaves had been in round 1: wrong.
    row, _ = judge_analytics_round(scenario, _record(analytics), _uploads(1), lambda _: path)
    assert not row.passed


def test_a_dropped_leaf_leads_the_message(scenario: Scenario, tmp_path: Path) -> None:
    path, analytics = _aggregate(scenario, tmp_path, leaf_round=1, fault="drop_leaf")
    row, section = judge_analytics_round(scenario, _record(analytics), _uploads(1), lambda _: path)
    assert not row.passed and row.reason is not None
    assert row.reason.startswith("leaf 0 (id-0)'s upload is missing from the aggregate")
    assert section["reason"] == row.reason and section["verdict"]["passed"] is False


def test_rounds_that_cannot_be_judged_say_why(scenario: Scenario, tmp_path: Path) -> None:
    path, analytics = _aggregate(scenario, tmp_path, leaf_round=1)
    failed = _record(analytics, status="failed")
    row, _ = judge_analytics_round(scenario, failed, _uploads(1), lambda _: path)
    assert row.reason is not None and row.reason.startswith("round did not aggregate")
    foreign = dict(_uploads(1))
    del foreign["file-2"]
    row, _ = judge_analytics_round(scenario, _record(analytics), foreign, lambda _: path)
    assert row.reason == "upload file-2 in the platform's record was not made by this run"
    row, _ = judge_analytics_round(scenario, _record(analytics), _uploads(1), lambda _: None)
    assert row.reason == "aggregate agg could not be downloaded"
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    junk = tmp_path / "junk.npz"
    row, _ = judge_analytics_round(scenario, _record(analytics), _uploads(1), lambda _: junk)
    assert row.reason is not None and "is not a readable archive" in row.reason
    # No derived statistics (a platform without round records): the fields are judged.
    row, section = judge_analytics_round(scenario, _record(None), _uploads(1), lambda _: path)
    assert row.passed and section["derived_checked"] is False


def test_failure_message_puts_forensics_first() -> None:
    verdict = AnalyticsJudgement(
        checks=10,
        findings=[
            AnalyticsFinding("tolerance", "field 'a_sum' is off"),
            AnalyticsFinding("leaf_missing", "leaf 2 (x)'s upload is missing", leaf="2 (x)"),
        ],
    )
    assert failure_message(verdict) == (
        "leaf 2 (x)'s upload is missing. 2 of 10 analytics checks failed, e.g. field 'a_sum' is off"
    )
    plain = AnalyticsJudgement(checks=4, findings=[AnalyticsFinding("exact", "field 'n' is 3")])
    assert failure_message(plain) == "1 of 4 analytics checks failed: field 'n' is 3"


def test_round_records_keep_their_kind_analytics_and_fault() -> None:
    raw = {
        "round": 1,
        "status": "aggregated",
        "aggregation_id": "a",
        "uploads": [],
        "kind": "federated_analytics",
        "analytics": {"derived": {"c": {"count": 3}}},
        "fault": {"analytics": "drop_leaf", "victim_leaf_id": "x"},
    }
    rec = RoundRecord.from_dict(raw)
    assert rec.kind == "federated_analytics" and rec.fault == raw["fault"]
    assert rec.analytics == raw["analytics"]
    assert RoundRecord.from_dict(rec.to_dict()) == rec
    learning = RoundRecord.from_dict({"round": 1, "status": "aggregated"})
    assert set(learning.to_dict()) == {
        "round", "status", "aggregation_id", "uploads", "close_reason", "error", "closed_at"
    }  # fmt: skip


def test_the_report_section_and_summary_lead_with_the_forensics() -> None:
    findings = [
        {"check": "exact", "message": "field 'c_n' is 3", "field": "c_n"},
        {"check": "leaf_missing", "message": "leaf 1 (y) is missing", "leaf": "1 (y)"},
    ]
    analytics = [
        {"round": 1, "passed": True, "uploads": 3, "verdict": {"checks": 9, "findings": []},
         "histograms": {"c": {}}},
        {"round": 2, "passed": False, "uploads": 3, "reason": "leaf 1 (y) is missing",
         "verdict": {"checks": 9, "findings": findings}, "histograms": {"c": {}},
         "platform_fault": {"analytics": "drop_leaf", "victim_leaf_id": "y"}},
    ]  # fmt: skip
    rounds = [
        {"round": 1, "passed": True, "uploads": 3},
        {"round": 2, "passed": False, "uploads": 3, "reason": "leaf 1 (y) is missing"},
    ]
    assert [a["round"] for a in plotted_rounds(analytics)] == [2]  # failed rounds drawn
    assert [a["round"] for a in plotted_rounds(analytics[:1])] == [1]  # else the last
    html = analytics_section(analytics, rounds, {"analytics_2": "<svg>plot</svg>"})
    assert html.index("leaf 1 (y) is missing") < html.index("field &#x27;c_n&#x27; is 3")
    assert "<svg>plot</svg>" in html and "drop_leaf" in html
    lines = summary_lines({"passed": False, "checks": [], "rounds": rounds, "analytics": analytics})
    assert lines[2].split() == ["round", "ok", "uploads", "checks", "failed", "wall", "s", "detail"]
    assert lines[4].split()[:5] == ["2", "NO", "3", "9", "2"]
