"""Judging a finished run: correctness per round, notification accounting, timings.

Input is only what the run left behind (the event log, the platform's round records
when it has them, the aggregates the leaves downloaded), so the same judgement can be
made again from a run folder. Uploads are regenerated from the seed, never shipped.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bk_sim import npzstream
from bk_sim.engine._fa_checks import judge_analytics_round
from bk_sim.engine._records import RecordedUpload, RoundRecord, RoundVerdict
from bk_sim.errors import AggregationError, WeightsFormatError
from bk_sim.scenario import Scenario
from bk_sim.synth import SharedDraws, leaf_update, leaf_update_chunks
from bk_sim.validate import (
    Comparison,
    compare,
    compare_chunked,
    forensics,
    reference_aggregate,
)

FetchAggregate = Callable[[str], Path | None]


@dataclass(frozen=True)
class Check:
    """One named check: a junit test case and a line of the verdict."""

    name: str
    passed: bool
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "message": self.message}


@dataclass
class _Upload:
    leaf: int
    leaf_id: str
    round: int
    file_id: str
    weighting: float
    base: str | None
    t_start: float
    bytes: int
    harness_cpu_s: float  # generating + compressing it, CPU time of the leaf's thread


@dataclass
class Judgement:
    checks: list[Check] = field(default_factory=list)
    rounds: list[RoundVerdict] = field(default_factory=list)
    notifications: dict[str, Any] = field(default_factory=dict)
    downloads: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    leaves: dict[str, Any] = field(default_factory=dict)
    #: federated analytics: per round, the judge's verdict and the column histograms
    analytics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


def _percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def _uploads(events: Sequence[Mapping[str, Any]]) -> dict[str, _Upload]:
    found: dict[str, _Upload] = {}
    for e in events:
        if e.get("kind") != "upload":
            continue
        spent = float(e.get("duration_s", 0))
        found[e["file_id"]] = _Upload(
            leaf=int(e["leaf"]),
            leaf_id=str(e["leaf_id"]),
            round=int(e["round"]),
            file_id=str(e["file_id"]),
            weighting=float(e["weighting"]),
            base=e.get("base_aggregation_id"),
            t_start=float(e.get("begun", float(e["t"]) - spent)),
            bytes=int(e.get("bytes", 0)),
            harness_cpu_s=float(e.get("generate_cpu_s", 0)) + float(e.get("encode_cpu_s", 0)),
        )
    return found


def records_from_events(events: Sequence[Mapping[str, Any]]) -> list[RoundRecord]:
    """Round records built from this run's own events, for a platform that has none.

    Each upload belongs to the aggregate its leaf was notified of next (remote mode).
    """
    uploads = _uploads(events)
    by_leaf_round = {(u.leaf, u.round): u for u in uploads.values()}
    groups: dict[str, list[_Upload]] = defaultdict(list)
    order: list[str] = []
    for e in events:
        if e.get("kind") != "aggregate_notified":
            continue
        up = by_leaf_round.get((int(e["leaf"]), int(e["round"])))
        agg = str(e["aggregation_id"])
        if agg not in groups:
            order.append(agg)
        if up is not None:
            groups[agg].append(up)
    return [
        RoundRecord(
            round=i + 1,
            status="aggregated",
            aggregation_id=agg,
            uploads=tuple(RecordedUpload(u.leaf_id, u.file_id, u.weighting) for u in groups[agg]),
        )
        for i, agg in enumerate(order)
    ]


class _Aggregates:
    """Aggregate layers by id: from the run folder, else fetched once; a few kept."""

    def __init__(self, directory: Path, fetch: FetchAggregate | None) -> None:
        self._dir = directory
        self._fetch = fetch
        self._cache: dict[str, list[np.ndarray]] = {}

    def path(self, aggregation_id: str) -> Path | None:
        """The aggregate's file in the run folder, fetched there first if need be."""
        path = self._dir / f"{aggregation_id}.npz"
        if not path.exists() and self._fetch is not None:
            fetched = self._fetch(aggregation_id)
            if fetched is not None and fetched != path:
                path.parent.mkdir(parents=True, exist_ok=True)
                fetched.replace(path)
        return path if path.exists() else None

    def get(self, aggregation_id: str) -> list[np.ndarray] | None:
        if aggregation_id in self._cache:
            return self._cache[aggregation_id]
        path = self.path(aggregation_id)
        if path is None:
            return None
        try:
            layers = npzstream.load_layers(path)  # decoded chunk by chunk (issue 17)
        except WeightsFormatError:
            return None
        self._cache[aggregation_id] = layers
        # A round needs its aggregate and its base: two models, not four (issue 17).
        if len(self._cache) > 2:
            self._cache.pop(next(iter(self._cache)))
        return layers


class _Regenerated(Mapping[str, tuple[float, list[np.ndarray]]]):
    """Leaf id -> (weighting, layers), regenerated on access: one upload in memory at a time."""

    def __init__(self, scenario: Scenario, uploads: Sequence[_Upload], aggregates: Any) -> None:
        self._sc = scenario
        self._by_leaf = {u.leaf_id: u for u in uploads}
        self._aggregates = aggregates

    def __getitem__(self, leaf_id: str) -> tuple[float, list[np.ndarray]]:
        up = self._by_leaf[leaf_id]
        base = None if up.base is None else self._aggregates.get(up.base)
        return up.weighting, leaf_update(self._sc.seed, up.leaf, up.round, base, self._sc.model)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_leaf)

    def __len__(self) -> int:
        return len(self._by_leaf)


def judge(
    scenario: Scenario,
    events: Sequence[Mapping[str, Any]],
    records: Sequence[RoundRecord] | None,
    aggregates_dir: Path,
    *,
    fetch: FetchAggregate | None = None,
    run_started: float | None = None,
) -> Judgement:
    """Every check of a finished run, from what it left behind."""
    j = Judgement()
    uploads = _uploads(events)
    leaf_names = {
        str(e["leaf_id"]): f"leaf {e['leaf']} ({e['leaf_id']})"
        for e in events
        if "leaf_id" in e and "leaf" in e
    }
    if records is None:
        records = records_from_events(events)
    aggregates = _Aggregates(aggregates_dir, fetch)
    earlier: dict[str, int] = {}  # aggregation id -> round it first belonged to
    validation_s = 0.0
    harness_shares: list[float] = []
    downloads_by_agg: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("kind") == "download":
            downloads_by_agg[str(e["aggregation_id"])].append(float(e["t"]))

    analytics = scenario.payload.kind == "federated_analytics"
    for rec in records:
        t0 = time.perf_counter()
        if analytics:
            row, section = judge_analytics_round(scenario, rec, uploads, aggregates.path)
            j.analytics.append(section)
        else:
            row = _judge_round(scenario, rec, uploads, aggregates, earlier, leaf_names)
        spent = time.perf_counter() - t0
        validation_s += spent
        row = replace(row, validation_s=spent)
        agg_id = rec.aggregation_id
        ups = [uploads[u.file_id] for u in rec.uploads if u.file_id in uploads]
        if ups and agg_id and downloads_by_agg.get(agg_id):
            wall = max(downloads_by_agg[agg_id]) - min(u.t_start for u in ups)
            share: float | None = None
            if wall > 0:
                harness = sum(u.harness_cpu_s for u in ups)
                share = (harness + spent) / (wall * (os.cpu_count() or 1))
                harness_shares.append(share)
            mb = sum(u.bytes for u in ups) / 1e6
            row = replace(
                row,
                wall_time_s=wall,
                harness_share=share,
                validator_mb_s=(mb / spent) if spent > 0 else None,
            )
        if agg_id and agg_id not in earlier:
            earlier[agg_id] = rec.round
        j.rounds.append(row)
        what = "analytics correct" if analytics else "aggregate correct"
        j.checks.append(Check(f"round {row.round}: {what}", row.passed, row.reason or ""))

    if not records:
        j.checks.append(Check("rounds: at least one round aggregated", False, "no round closed"))

    _judge_notifications(j, events, records)
    _judge_downloads(j, events)
    _judge_leaves(j, events, scenario)
    _timings(j, events, uploads, records, run_started, validation_s, harness_shares)
    return j


def _judge_round(
    scenario: Scenario,
    rec: RoundRecord,
    uploads: Mapping[str, _Upload],
    aggregates: _Aggregates,
    earlier: Mapping[str, int],
    names: Mapping[str, str],
) -> RoundVerdict:
    strategy = scenario.validation.strategy or scenario.platform.strategy
    row = RoundVerdict(
        round=rec.round,
        aggregation_id=rec.aggregation_id,
        strategy=strategy,
        close_reason=rec.close_reason,
        uploads=len(rec.uploads),
    )
    if not rec.aggregated or rec.aggregation_id is None:
        return replace(row, reason=f"round did not aggregate (status {rec.status}: {rec.error})")
    agg_id = rec.aggregation_id
    mine = []
    for u in rec.uploads:
        up = uploads.get(u.file_id)
        if up is None:
            return replace(
                row, reason=f"upload {u.file_id} in the platform's record was not made by this run"
            )
        recorded = up.weighting if u.weighting is None else u.weighting
        if abs(up.weighting - recorded) > 1e-9 * up.weighting:
            return replace(
                row,
                reason=f"{names.get(up.leaf_id, up.leaf_id)} uploaded weighting {up.weighting} "
                f"but the platform recorded {u.weighting}",
            )
        mine.append(up)
    actual = aggregates.get(agg_id)
    if actual is None:
        return replace(row, reason=f"aggregate {agg_id} could not be downloaded")

    cmp: Comparison | None = None
    if strategy in ("fedavg", "mean"):
        # Chunk by chunk first (issue 17): a pass costs a few MiB besides the aggregate
        # and its base; a failure is judged again whole below, for forensics.
        cmp = _compare_streaming(scenario, mine, aggregates, actual, strategy)
        if cmp is not None and not cmp.passed:
            cmp = None
    contributions = _Regenerated(scenario, mine, aggregates)
    if cmp is None:
        try:  # a platform bug (no uploads, a base of the wrong shape) fails the round
            reference = reference_aggregate(
                contributions.values(), strategy, trim_fraction=scenario.platform.trim_fraction
            )
        except (AggregationError, ValueError) as exc:
            return replace(row, reason=f"no reference for the uploads the platform recorded: {exc}")
        cmp = compare(
            reference, actual, rtol=scenario.validation.rtol, atol=scenario.validation.atol
        )
    layers: tuple[dict[str, Any], ...] = tuple(
        {
            "index": lc.index,
            "shape": list(lc.shape),
            "dtype": str(lc.dtype),
            "max_abs_error": lc.max_abs_error,
            "max_rel_error": lc.max_rel_error,
            "passed": lc.passed,
        }
        for lc in cmp.layers
    )
    row = replace(
        row, max_abs_error=cmp.max_abs_error, max_rel_error=cmp.max_rel_error, layers=layers
    )
    if cmp.passed:
        return replace(row, passed=True)
    reason = cmp.reason or "aggregate differs from the reference"
    if agg_id in earlier:
        stale = (
            f"the aggregate is round {earlier[agg_id]}'s aggregate ({agg_id}), served again: stale"
        )
        return replace(
            row,
            reason=stale,
            forensics={"summary": stale, "stale_of": agg_id, "stale_round": earlier[agg_id]},
        )
    previous = {a: agg for a in earlier if (agg := aggregates.get(a)) is not None}
    found = forensics(
        actual,
        contributions,
        strategy,
        previous_aggregates=previous,
        sample=max(scenario.validation.forensics_sample, 4 * len(contributions)),
        seed=scenario.seed,
        trim_fraction=scenario.platform.trim_fraction,
    )
    details = found.to_dict()
    summary = found.summary
    for up in mine:  # "Leaf <uuid>" -> "Leaf 3 (<uuid>)": people count leaves by index
        summary = summary.replace(up.leaf_id, f"{up.leaf} ({up.leaf_id})")
    if found.stale_of is not None and found.stale_of in earlier:
        summary += f" (round {earlier[found.stale_of]})"
    details["summary"] = summary
    # Forensics that blame no leaf ("all leaves got their weight") must not hide what failed.
    return replace(
        row,
        forensics=details,
        reason=summary if found.found_fault else f"{reason}. {summary}",
    )


#: Elements regenerated and compared at a time: the comparison makes ~8 float64
#: temporaries per chunk, so 256 Ki elements keep it near 16 MiB.
_JUDGE_CHUNK = 2**18


def _compare_streaming(
    scenario: Scenario,
    mine: Sequence[_Upload],
    aggregates: _Aggregates,
    actual: Sequence[np.ndarray],
    strategy: str,
) -> Comparison | None:
    """The round's verdict regenerated and compared chunk by chunk; None if it can't be."""
    contributions = []
    shared = SharedDraws()  # the contributions advance in lockstep: G drawn once a chunk
    for up in mine:
        base = None if up.base is None else aggregates.get(up.base)
        if up.base is not None and base is None:
            return None
        try:
            chunks = leaf_update_chunks(
                scenario.seed,
                up.leaf,
                up.round,
                base,
                scenario.model,
                chunk=_JUDGE_CHUNK,
                shared=shared,
            )
        except ValueError:
            return None
        contributions.append((up.weighting, chunks))
    try:
        return compare_chunked(
            contributions,
            actual,
            weighted=strategy == "fedavg",
            expected_dtypes=[np.dtype(layer.dtype) for layer in scenario.model.layers],
            rtol=scenario.validation.rtol,
            atol=scenario.validation.atol,
        )
    except (AggregationError, ValueError):
        return None


def _judge_notifications(
    j: Judgement, events: Sequence[Mapping[str, Any]], records: Sequence[RoundRecord]
) -> None:
    open_span: dict[str, list[float]] = {}
    received: Counter[tuple[str, str]] = Counter()
    for e in events:
        kind = e.get("kind")
        leaf = e.get("leaf_id")
        if leaf is None:
            continue
        # The leaf's queue is durable and exists from provisioning: a leaf is owed every
        # aggregate that closes while its client is open, connected yet or not.
        if kind == "leaf_started" and leaf not in open_span:
            open_span[leaf] = [float(e["t"]), float("inf")]
        elif kind in ("leaf_closed", "leaf_died") and leaf in open_span:
            open_span[leaf][1] = min(open_span[leaf][1], float(e["t"]))
        elif kind == "notification" and e.get("message_type") == "aggregation_status":
            received[(leaf, str(e.get("value")))] += 1
    expected: set[tuple[str, str]] = set()
    for rec in records:
        agg = rec.aggregation_id
        if not rec.aggregated or not agg:
            continue
        closed_t = as_time(rec.closed_at)
        for leaf, (start, end) in open_span.items():
            if closed_t is None or start <= closed_t <= end:
                expected.add((leaf, str(agg)))
    lost = sorted(pair for pair in expected if received[pair] == 0)
    duplicates = sum(max(0, n - 1) for n in received.values())
    j.notifications = {
        "expected": len(expected),
        "received": sum(1 for pair in expected if received[pair] > 0),
        "lost": len(lost),
        "duplicates": duplicates,
        "lost_examples": [{"leaf_id": a, "aggregation_id": b} for a, b in lost[:10]],
    }
    msg = f"{len(lost)} lost, {duplicates} duplicated of {len(expected)} expected"
    # Duplicates are reported, not failed: delivery is at least once (a redelivery after a
    # reconnect is allowed); ``bk-sim chaos`` bounds them with chaos.expect.
    j.checks.append(Check("notifications: every leaf notified of every round", not lost, msg))


def as_time(value: Any) -> float | None:
    """A record's time (Unix seconds or ISO 8601, as platforms write it) in Unix seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _judge_downloads(j: Judgement, events: Sequence[Mapping[str, Any]]) -> None:
    digests: dict[str, set[str]] = defaultdict(set)
    count = 0
    for e in events:
        if e.get("kind") == "download":
            digests[str(e["aggregation_id"])].add(str(e["digest"]))
            count += 1
    differing = sorted(a for a, d in digests.items() if len(d) > 1)
    j.downloads = {"count": count, "aggregates": len(digests), "differing": differing}
    j.checks.append(
        Check(
            "downloads: every leaf received the same bytes",
            not differing,
            f"aggregates with differing bytes: {', '.join(differing)}" if differing else "",
        )
    )


def _judge_leaves(j: Judgement, events: Sequence[Mapping[str, Any]], scenario: Scenario) -> None:
    errors = [e for e in events if e.get("kind") == "leaf_error"]
    died = [e for e in events if e.get("kind") == "leaf_died"]
    done = {e["leaf"] for e in events if e.get("kind") == "leaf_done"}
    started = {e["leaf"] for e in events if e.get("kind") == "leaf_started"}
    # A leaf stopped by the run deadline, or lost with its process, leaves no error event:
    # it still did not play its rounds.
    accounted = done | {e.get("leaf") for e in died} | {e.get("leaf") for e in errors}
    unfinished = sorted(set(range(scenario.leaves.count)) - accounted)
    j.leaves = {
        "count": scenario.leaves.count,
        "started": len(started),
        "completed": len(done),
        "died_as_planned": len(died),
        "unfinished": unfinished[:50],
        "errors": [
            {"leaf": e.get("leaf"), "round": e.get("round"), "error": e.get("error")}
            for e in errors[:50]
        ],
    }
    msg = "; ".join(
        f"leaf {e.get('leaf')} round {e.get('round')}: {e.get('error')}" for e in errors[:3]
    )
    if unfinished:
        shown = ", ".join(map(str, unfinished[:10])) + (" ..." if len(unfinished) > 10 else "")
        msg = f"{msg}; " if msg else ""
        msg += f"{len(unfinished)} leaves stopped before their last round (leaves {shown})"
    j.checks.append(
        Check(
            "leaves: every leaf played its rounds",
            not errors and not unfinished,
            f"{len(errors)} errors. {msg}".strip(),
        )
    )


def _timings(
    j: Judgement,
    events: Sequence[Mapping[str, Any]],
    uploads: Mapping[str, _Upload],
    records: Sequence[RoundRecord],
    run_started: float | None,
    validation_s: float,
    harness_shares: Sequence[float],
) -> None:
    spawned = next((float(e["t"]) for e in events if e.get("kind") == "leaves_spawning"), None)
    if spawned is not None:
        run_started = spawned
    connects: dict[str, float] = {}
    for e in events:
        if e.get("kind") == "connect" and e.get("leaf_id") not in connects:
            connects[str(e["leaf_id"])] = float(e["t"])
    closed_at = {
        r.aggregation_id: t
        for r in records
        if r.aggregation_id and (t := as_time(r.closed_at)) is not None
    }
    notify_latency = [
        float(e["t"]) - closed_at[str(e.get("value"))]
        for e in events
        if e.get("kind") == "notification" and str(e.get("value")) in closed_at
    ]
    # Ours: one http_request per attempt; a published client's: one per call, its
    # retries included (published_http_request), the finest it can be observed at.
    upload_s = [
        float(e["duration_s"])
        for e in events
        if e.get("kind") in ("http_request", "published_http_request")
        and e.get("endpoint") == "upload"
        and "duration_s" in e
    ]
    walls = [r.wall_time_s for r in j.rounds if r.wall_time_s is not None]
    started = [float(e["t"]) for e in events if e.get("kind") == "leaf_started"]
    speeds = [r.validator_mb_s for r in j.rounds if r.validator_mb_s]
    j.timings = {
        "leaves_started_s": (max(started) - run_started) if started and run_started else None,
        "leaves_connected_s": (max(connects.values()) - run_started)
        if connects and run_started
        else None,
        "validator_mb_s": min(speeds) if speeds else None,
        "orchestrator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "round_wall_time_s": walls,
        "upload_latency_s": _percentiles(upload_s, (50, 95, 99)),
        "notification_latency_s": _percentiles(notify_latency, (50, 99)),
        "validation_s": validation_s,
        "harness_share": max(harness_shares) if harness_shares else None,
        "uploads": len(uploads),
    }
