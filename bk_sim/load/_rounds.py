"""Correct under load: every aggregate the platform closed during a load, judged.

Load users upload the prepared payload files (``_payloads``), so each upload a round
record lists is one of ``load.payload_variants`` known archives, named by its digest.
Variant ``v`` is ``leaf_update(seed, v, 1, None, model)`` with weighting
``leaf_weightings(...)[v]``: exactly what the run engine's judge regenerates for leaf
``v`` of round 1 with no base. So the load hands the engine's judge one synthetic
``upload`` event per recorded upload and takes its round verdicts (float64 reference,
stale detection, forensics) unchanged. An upload whose digest is no variant is "not made
by this run", as in ``bk-sim run``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bk_sim import weights
from bk_sim.client import Client
from bk_sim.engine import Check, RoundRecord, RoundVerdict, judge
from bk_sim.errors import BkSimError, WeightsFormatError
from bk_sim.load._payloads import PayloadCache
from bk_sim.scenario import Scenario
from bk_sim.synth import leaf_update, leaf_weightings
from bk_sim.validate import forensics

_log = logging.getLogger(__name__)

#: Statuses a round ends in; an ``open`` round at the end of the load is listed, not judged.
_CLOSED = ("aggregated", "failed")


@dataclass
class LoadRounds:
    """The rounds section of a load's results and its checks."""

    checks: list[Check] = field(default_factory=list)
    rounds: list[RoundVerdict] = field(default_factory=list)
    open_at_end: int = 0
    validation_s: float = 0.0

    def section(self) -> dict[str, Any]:
        return {
            "rounds": [r.to_dict() for r in self.rounds],
            "rounds_summary": {
                "judged": len(self.rounds),
                "passed": sum(r.passed for r in self.rounds),
                "open_at_end": self.open_at_end,
                "validation_s": self.validation_s,
            },
        }


def wait_rounds_closed(
    read: Callable[[], list[RoundRecord] | None], timeout_s: float
) -> list[RoundRecord] | None:
    """The round records once no round holding uploads is still open (at most
    ``timeout_s``): the load's last round closes on its timeout after the users stop."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read()
        if records is None:
            return None
        if not any(r.status == "open" and r.uploads for r in records):
            return records
        if time.monotonic() >= deadline:
            return records
        time.sleep(0.2)


def fetch_aggregates(
    records: Sequence[RoundRecord], api_url: str, credentials: dict[str, str], into: Path
) -> None:
    """Download every closed round's aggregate while the platform still runs, as a leaf."""
    into.mkdir(parents=True, exist_ok=True)
    wanted = [
        r.aggregation_id
        for r in records
        if r.aggregated and r.aggregation_id and not (into / f"{r.aggregation_id}.npz").exists()
    ]
    if not wanted:
        return
    try:
        with Client(
            credentials, host=api_url, ssl=False, notifications=False, output_dir=into
        ) as client:
            for agg in wanted:
                try:
                    got = Path(client.file_download(agg))
                    if got != into / f"{agg}.npz":
                        got.replace(into / f"{agg}.npz")
                except BkSimError as exc:  # the judge says "could not be downloaded"
                    _log.warning("could not fetch aggregate %s: %s", agg, exc)
    except BkSimError as exc:
        _log.warning("could not fetch aggregates: %s", exc)


def judge_load_rounds(
    scenario: Scenario,
    records: Sequence[RoundRecord],
    payloads: PayloadCache,
    aggregates_dir: Path,
) -> LoadRounds:
    """Every closed round's aggregate against the float64 reference of its uploads."""
    out = LoadRounds(open_at_end=sum(r.status not in _CLOSED for r in records))
    closed = [r for r in records if r.status in _CLOSED]
    if not closed:
        out.checks.append(
            Check("rounds: at least one round aggregated", False, "no round closed under load")
        )
        return out
    variant_of = {d: v for v, d in enumerate(payloads.digests)}
    weightings = leaf_weightings(scenario.seed, scenario.leaves.weighting, scenario.leaves.count)
    events: list[dict[str, Any]] = []
    variants_of: dict[int, dict[str, int]] = {}
    for rec in closed:
        for u in rec.uploads:
            v = variant_of.get(u.digest or "")
            if v is None:  # no event: the judge reports it as not made by this run
                continue
            variants_of.setdefault(rec.round, {})[u.leaf_id] = v
            events.append(
                {
                    "t": 0.0,
                    "kind": "upload",
                    "leaf": v,
                    "leaf_id": u.leaf_id,
                    "round": 1,
                    "file_id": u.file_id,
                    "weighting": float(weightings[v % len(weightings)]),
                }
            )
    t0 = time.perf_counter()
    found = judge(scenario, events, closed, aggregates_dir)
    out.validation_s = time.perf_counter() - t0
    weighting_of = [float(weightings[v % len(weightings)]) for v in range(len(payloads.digests))]
    for row in found.rounds:
        variants = variants_of.get(row.round, {})
        row = _name_variants(row, variants)
        if not row.passed and row.forensics is not None and row.aggregation_id:
            row = _by_variant(scenario, row, variants, weighting_of, aggregates_dir)
        out.rounds.append(row)
        out.checks.append(
            Check(f"round {row.round}: aggregate correct", row.passed, row.reason or "")
        )
    return out


def _by_variant(
    scenario: Scenario,
    row: RoundVerdict,
    variants: dict[str, int],
    weighting_of: Sequence[float],
    aggregates_dir: Path,
) -> RoundVerdict:
    """Forensics over payload variants when leaves of the round uploaded the same bytes.

    Two identical uploads cannot be told apart by a least-squares fit (the per-leaf fit
    splits their weight anyhow), but their variant can: fit one weight per variant, then
    find how many of each variant's uploads the aggregate counted. FedAvg only (the other
    strategies are not linear in the uploads).
    """
    groups: dict[int, list[str]] = {}
    for leaf_id, v in variants.items():
        groups.setdefault(v, []).append(leaf_id)
    strategy = scenario.validation.strategy or scenario.platform.strategy
    if strategy != "fedavg" or all(len(g) == 1 for g in groups.values()):
        return row
    path = aggregates_dir / f"{row.aggregation_id}.npz"
    try:
        actual = weights.read_layers(path)
    except (OSError, WeightsFormatError):
        return row
    contributions = {
        f"variant {v}": (
            weighting_of[v] * len(g),
            leaf_update(scenario.seed, v, 1, None, scenario.model),
        )
        for v, g in sorted(groups.items())
    }
    found = forensics(actual, contributions, "fedavg", sample=4096, seed=scenario.seed)
    eff = found.effective_weights
    if len(eff) != len(groups) or not all(math.isfinite(x) for x in eff.values()):
        return row
    counted = _counts(
        {v: eff[f"variant {v}"] / weighting_of[v] for v in groups},
        {v: len(g) for v, g in groups.items()},
    )
    if counted is None:
        return row
    notes = []
    for v, g in sorted(groups.items()):
        n, c = len(g), counted[v]
        if c != n:
            what = "dropped" if c < n else "counted twice"
            notes.append(
                f"payload variant {v}, uploaded by {n} leaves ({', '.join(sorted(g))}), was "
                f"counted {c} time(s): {abs(n - c)} upload(s) {what}"
            )
    if not notes:
        return row
    text = "; ".join(notes) + " (identical uploads: forensics by payload variant)"
    details = {
        **dict(row.forensics or {}),
        "summary": text,
        "by_variant": {
            str(v): {"leaves": sorted(g), "uploads": len(g), "counted": counted[v]}
            for v, g in sorted(groups.items())
        },
    }
    return replace(row, reason=f"{text}. {row.reason}", forensics=details)


def _counts(ratios: dict[int, float], uploads: dict[int, int]) -> dict[int, int] | None:
    """Whole upload counts proportional to ``ratios`` (effective weight / weighting):
    of the totals that make them integers, the one that changes the fewest uploads (the
    fit fixes only the proportions, so the total is chosen, not measured)."""
    total = sum(ratios.values())
    if total <= 0:
        return None
    n = sum(uploads.values())
    best: tuple[float, int, dict[int, int]] | None = None
    for t in range(1, 2 * n + 1):
        scaled = {v: r * t / total for v, r in ratios.items()}
        err = round(max(abs(x - round(x)) for x in scaled.values()), 3)
        counts = {v: round(x) for v, x in scaled.items()}
        changed = sum(abs(counts[v] - uploads[v]) for v in counts)
        if best is None or (err, changed) < (best[0], best[1]):
            best = (err, changed, counts)
    if best is None or best[0] > 0.1:
        return None
    return best[2]


def _name_variants(row: RoundVerdict, variants: dict[str, int]) -> RoundVerdict:
    """The judge names a leaf "leaf <index> (<id>)"; under load the index is the payload
    variant, so say so."""

    def fix(text: str) -> str:
        for leaf_id, v in variants.items():
            text = text.replace(f"{v} ({leaf_id})", f"{leaf_id} (payload variant {v})")
        return text

    reason = None if row.reason is None else fix(row.reason)
    forensics = row.forensics
    if forensics is not None and isinstance(forensics.get("summary"), str):
        forensics = {**forensics, "summary": fix(forensics["summary"])}
    return replace(row, reason=reason, forensics=forensics)
