"""Judging one federated-analytics round of a finished run.

The platform's round record says which uploads (leaf ids, file ids) it combined; the
run's events say which leaf (= site index) made each and in which of its rounds. The
judge regenerates those sites' columns from the seed (``bk_sim.synth``) and checks the
downloaded aggregate and the record's derived statistics with
``bk_sim.validate.judge_analytics``. A failure's message leads with the forensics (the
leaf dropped or counted twice, the field a NaN reached, the column whose statistics were
pooled), then how many checks failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bk_sim.analytics import load_payload
from bk_sim.engine._records import RoundRecord, RoundVerdict
from bk_sim.errors import BkSimError
from bk_sim.scenario import Scenario
from bk_sim.synth import TabularSpec, field_ops, site_columns, site_fields, tabular_spec
from bk_sim.validate import AnalyticsJudgement, column_histograms, judge_analytics

_log = logging.getLogger(__name__)

#: The strategy an FA round reports (the platform's record says the same).
FA_STRATEGY = "field_ops"
#: How many findings a check's message spells out.
_SHOWN = 3

Site = tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class UploadSeen(Protocol):
    """What the judge needs of an upload the run's events recorded."""

    leaf: int
    leaf_id: str
    round: int


def judge_analytics_round(
    scenario: Scenario,
    rec: RoundRecord,
    uploads: Mapping[str, UploadSeen],
    aggregate_path: Callable[[str], Path | None],
) -> tuple[RoundVerdict, dict[str, Any]]:
    """The round's verdict and its results.json ``analytics`` entry (the judge's JSON and
    each column's pooled and per-site histograms)."""
    row = RoundVerdict(
        round=rec.round,
        aggregation_id=rec.aggregation_id,
        strategy=FA_STRATEGY,
        close_reason=rec.close_reason,
        uploads=len(rec.uploads),
    )
    section: dict[str, Any] = {
        "round": rec.round,
        "aggregation_id": rec.aggregation_id,
        "uploads": len(rec.uploads),
        "passed": False,
    }
    if rec.fault:
        section["platform_fault"] = dict(rec.fault)

    def failed(reason: str) -> tuple[RoundVerdict, dict[str, Any]]:
        section["reason"] = reason
        return replace(row, reason=reason), section

    if not rec.aggregated or rec.aggregation_id is None:
        return failed(f"round did not aggregate (status {rec.status}: {rec.error})")
    mine: list[UploadSeen] = []
    for u in rec.uploads:
        up = uploads.get(u.file_id)
        if up is None:
            return failed(f"upload {u.file_id} in the platform's record was not made by this run")
        if up.leaf_id != u.leaf_id:
            return failed(
                f"upload {u.file_id} was made by leaf {up.leaf} ({up.leaf_id}) but the "
                f"platform recorded leaf {u.leaf_id}"
            )
        mine.append(up)
    path = aggregate_path(rec.aggregation_id)
    if path is None:
        return failed(f"aggregate {rec.aggregation_id} could not be downloaded")
    try:
        aggregate = load_payload(path)
    except (BkSimError, OSError, ValueError) as exc:
        return failed(f"aggregate {rec.aggregation_id} is not a readable archive: {exc}")
    spec = tabular_spec(scenario)
    derived = rec.analytics.get("derived") if rec.analytics else None
    verdict = judge_analytics(
        _sites(spec, mine),
        aggregate,
        field_ops=field_ops(spec),
        derived=derived if isinstance(derived, Mapping) else None,
    )
    histograms = column_histograms(_sites(spec, mine), verdict.pooled)
    section.update(
        passed=verdict.passed,
        derived_checked=isinstance(derived, Mapping),
        verdict=verdict.to_json(),
        summary=verdict.summary(),
        histograms={name: h.to_json() for name, h in histograms.items()},
    )
    if verdict.passed:
        return replace(row, passed=True), section
    return failed(failure_message(verdict))


def _sites(spec: TabularSpec, uploads: list[UploadSeen]) -> Iterator[Site]:
    """Each recorded upload's site regenerated: label, raw columns, custom fields; one
    site in memory at a time."""
    for up in uploads:
        cols = site_columns(spec, up.leaf, up.round)
        yield f"{up.leaf} ({up.leaf_id})", cols, site_fields(spec, up.leaf, cols, up.round)


def failure_message(verdict: AnalyticsJudgement) -> str:
    """One line, the forensics first (they name the leaf or the field), then the count
    of failed checks and the first other findings."""
    forensic = [f.message for f in verdict.forensics]
    others = [f.message for f in verdict.findings if f not in verdict.forensics]
    failed = f"{len(verdict.findings)} of {verdict.checks} analytics checks failed"
    if forensic:
        lead = "; ".join(forensic[:_SHOWN])
        if len(forensic) > _SHOWN:
            lead += f" (and {len(forensic) - _SHOWN} more like it)"
        first = f", e.g. {others[0]}" if others else ""
        return f"{lead}. {failed}{first}"
    shown = "; ".join(others[:_SHOWN])
    return f"{failed}: {shown}" + (" ..." if len(others) > _SHOWN else "")
