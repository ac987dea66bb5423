"""Figures derived from the event log: latencies, statuses, spans, faults, throughput.

Pure functions of the event list (no files, no plotting), so the plots, the HTML and the
run comparison all read the same numbers and tests can feed hand-made events.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

Event = Mapping[str, Any]

#: The per-leaf timeline shows at most this many leaves (a 1,000-leaf run stays readable).
MAX_TIMELINE_LEAVES = 60
#: Notification-transport events drawn on the reconnect timeline.
CONNECTION_KINDS = ("connect", "disconnect", "reconnect_wait", "connect_failed", "give_up")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def leaf_index_by_id(events: Iterable[Event]) -> dict[str, int]:
    """Leaf id -> the harness's leaf index, from any event that carries both."""
    out: dict[str, int] = {}
    for e in events:
        lid, idx = e.get("leaf_id"), e.get("leaf")
        if isinstance(lid, str) and isinstance(idx, int) and lid not in out:
            out[lid] = idx
    return out


def leaf_of(e: Event, ids: Mapping[str, int]) -> int | None:
    """The leaf index an event belongs to, or ``None`` for run-wide events."""
    idx = e.get("leaf")
    if isinstance(idx, int):
        return idx
    lid = e.get("leaf_id")
    return ids.get(lid) if isinstance(lid, str) else None


def by_round(events: Iterable[Event], kind: str, value: str) -> dict[int, list[float]]:
    """``value`` of every ``kind`` event, grouped by its ``round``, rounds sorted."""
    out: dict[int, list[float]] = defaultdict(list)
    for e in events:
        if e.get("kind") == kind and isinstance(e.get(value), (int, float)):
            r = e.get("round")
            out[int(r) if isinstance(r, int) else 0].append(float(e[value]))
    return dict(sorted(out.items()))


def upload_durations(events: Iterable[Event]) -> dict[int, list[float]]:
    """Seconds each leaf's upload call took (retries included), per round."""
    return by_round(events, "upload", "duration_s")


def notification_waits(events: Iterable[Event]) -> dict[int, list[float]]:
    """Seconds from each leaf's upload to it hearing of the round's aggregate, per round."""
    return by_round(events, "aggregate_notified", "latency_s")


def _first_notifications(events: Sequence[Event]) -> dict[int, dict[str, float]]:
    """Round -> leaf id -> when that leaf first heard of the round's aggregate."""
    round_of = {
        str(e["aggregation_id"]): int(e["round"])
        for e in events
        if e.get("kind") == "aggregate_notified"
        and e.get("aggregation_id")
        and isinstance(e.get("round"), int)
    }
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for e in events:
        if e.get("kind") != "notification" or str(e.get("value")) not in round_of:
            continue
        per_leaf = out[round_of[str(e["value"])]]
        lid = str(e.get("leaf_id"))
        per_leaf[lid] = min(per_leaf.get(lid, math.inf), float(e["t"]))
    return dict(sorted(out.items()))


def notification_fanout(events: Sequence[Event]) -> dict[int, list[float]]:
    """Seconds from the first leaf hearing of a round's aggregate to each leaf hearing of it.

    The platform's close time is not in the event log; the first notification is the
    closest thing to it, so this is a lower bound of close -> notified, per round.
    """
    out = {}
    for r, per_leaf in _first_notifications(events).items():
        first = min(per_leaf.values())
        out[r] = sorted(t - first for t in per_leaf.values())
    return out


def aggregate_out_times(events: Sequence[Event], t0: float) -> dict[int, float]:
    """Round -> run seconds when the first leaf heard of its aggregate."""
    return {r: min(v.values()) - t0 for r, v in _first_notifications(events).items() if v}


def _status_label(e: Event) -> str:
    status = e.get("status")
    if isinstance(status, int):
        return str(status)
    return "no answer" if e.get("error") else "unknown"


def http_statuses(events: Iterable[Event]) -> dict[str, Counter[str]]:
    """HTTP attempts per endpoint, counted by status ("no answer" for transport errors)."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        if e.get("kind") == "http_request":
            out[str(e.get("endpoint") or "?")][_status_label(e)] += 1
    return dict(sorted(out.items()))


def retries_by_status(events: Iterable[Event]) -> Counter[str]:
    """Retry waits counted by the status (or transport failure) that caused them."""
    return Counter(_status_label(e) for e in events if e.get("kind") == "retry_wait")


def throughput(
    events: Sequence[Event], t0: float, kind: str = "upload", bins: int = 60
) -> tuple[list[float], list[float], float]:
    """Bytes per second of ``kind`` events over time: (bin starts, rates, bin width s)."""
    pts = [
        (float(e["t"]) - t0, float(e["bytes"]))
        for e in events
        if e.get("kind") == kind and isinstance(e.get("bytes"), (int, float))
    ]
    if not pts:
        return [], [], 0.0
    end = max(max(float(e["t"]) for e in events) - t0, 1e-9)
    width = max(end / bins, 0.25)
    n = int(math.ceil(end / width)) + 1
    sums = [0.0] * n
    for t, b in pts:
        sums[min(max(int(t // width), 0), n - 1)] += b
    return [i * width for i in range(n)], [s / width for s in sums], width


@dataclass(frozen=True)
class Span:
    """A stretch of one leaf's time (``kind`` upload, wait, download) in run seconds."""

    leaf: int
    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Mark:
    """An instant on one leaf's line (notification, error, died, skipped, disconnect)."""

    leaf: int
    kind: str
    t: float
    text: str = ""


def leaf_timeline(events: Sequence[Event], t0: float) -> tuple[list[Span], list[Mark]]:
    """Every leaf's prepare (generate + encode), upload, wait and download spans, plus marks."""
    ids = leaf_index_by_id(events)
    spans: list[Span] = []
    marks: list[Mark] = []
    upload_end: dict[tuple[int, Any], float] = {}
    for e in events:
        kind = e.get("kind")
        leaf = leaf_of(e, ids)
        if leaf is None:
            continue
        t = float(e["t"]) - t0
        if kind == "upload":
            d = e.get("duration_s")
            start = t - float(d) if isinstance(d, (int, float)) else t
            begun = e.get("begun")
            if isinstance(begun, (int, float)) and float(begun) - t0 < start:
                spans.append(Span(leaf, "prepare", float(begun) - t0, start))
            spans.append(Span(leaf, "upload", start, t))
            upload_end[(leaf, e.get("round"))] = t
        elif kind == "aggregate_notified":
            up = upload_end.get((leaf, e.get("round")))
            if up is not None and t > up:
                spans.append(Span(leaf, "wait", up, t))
            marks.append(Mark(leaf, "notified", t))
        elif kind == "download":
            d = e.get("duration_s")
            spans.append(Span(leaf, "download", t - float(d) if d else t, t))
        elif kind in ("leaf_error", "leaf_died", "round_skipped", "disconnect", "give_up"):
            marks.append(Mark(leaf, kind, t, str(e.get("reason") or e.get("error") or "")))
    return spans, marks


@dataclass(frozen=True)
class FaultSpan:
    """A fault the chaos schedule injected: from ``fault_start`` to ``fault_end``."""

    label: str
    start: float
    end: float
    leaves: tuple[int, ...] = ()  # empty: the fault hit the whole run (broker, network)
    kind: str = ""
    target: str = ""
    error: str = ""  # set by a fault_error event (injection or undo failed)
    ended: bool = True  # False: no fault_end, drawn to the end of the log

    @property
    def run_wide(self) -> bool:
        return not self.leaves


def _fault_label(e: Event) -> str:
    for key in ("fault", "name", "fault_kind", "action", "type"):
        if e.get(key):
            return str(e[key])
    return "fault"


def _fault_leaves(e: Event, ids: Mapping[str, int], all_leaves: int) -> tuple[int, ...]:
    """The leaves a fault targets; () when it targets all of them (or the run itself)."""
    raw = e.get("leaves")
    if isinstance(raw, list):
        leaves = tuple(sorted({int(x) for x in raw if isinstance(x, int)}))
    else:
        one = leaf_of(e, ids)
        leaves = () if one is None else (one,)
    return () if all_leaves and len(leaves) >= all_leaves else leaves


def fault_spans(events: Sequence[Event], t0: float) -> list[FaultSpan]:
    """Pair the chaos engine's ``fault_start``/``fault_end`` events (by fault name).

    ``fault_start`` carries ``fault`` (the name), ``fault_kind``, ``target`` and
    ``leaves`` (indices; all of them for a broker or network fault, drawn as run-wide).
    A fault that never ends lasts to the last event; an end without a start is ignored;
    ``fault_error`` is kept as the span's error.
    """
    ids = leaf_index_by_id(events)
    n_leaves = len({e["leaf"] for e in events if isinstance(e.get("leaf"), int)})
    spawning = [e for e in events if e.get("kind") == "leaves_spawning"]
    if spawning and isinstance(spawning[0].get("leaves"), int):
        n_leaves = int(spawning[0]["leaves"])
    open_: dict[Any, FaultSpan] = {}
    out: list[FaultSpan] = []
    errors: dict[Any, str] = {}
    last = (max(float(e["t"]) for e in events) - t0) if events else 0.0
    for e in events:
        kind = e.get("kind")
        if kind not in ("fault_start", "fault_end", "fault_error"):
            continue
        label = _fault_label(e)
        key = e.get("fault_id") or e.get("id") or label
        t = float(e["t"]) - t0
        if kind == "fault_error":
            errors[label] = str(e.get("error") or "failed")
        elif kind == "fault_start":
            if key in open_:  # started again before it ended: close the first one here
                out.append(replace(open_.pop(key), end=t))
            leaves = _fault_leaves(e, ids, n_leaves)
            open_[key] = FaultSpan(
                label,
                t,
                last,
                leaves,
                str(e.get("fault_kind") or ""),
                str(e.get("target") or ""),
                ended=False,
            )
        elif key in open_:
            out.append(replace(open_.pop(key), end=t, ended=True))
    out.extend(open_.values())
    out = [replace(f, error=errors.get(f.label, "")) if f.label in errors else f for f in out]
    return sorted(out, key=lambda f: f.start)


def sample_leaves(
    all_leaves: Iterable[int], notable: Iterable[int], limit: int = MAX_TIMELINE_LEAVES
) -> list[int]:
    """At most ``limit`` leaves: notable ones (errors, faults) first, the rest evenly spaced."""
    leaves = sorted(set(all_leaves))
    if len(leaves) <= limit:
        return leaves
    keep = sorted(set(notable) & set(leaves))[: limit // 2]
    rest = [x for x in leaves if x not in set(keep)]
    room = limit - len(keep)
    step = len(rest) / room
    keep += [rest[int(i * step)] for i in range(room)]
    return sorted(set(keep))


def connection_events(events: Sequence[Event]) -> list[Event]:
    """The notification transport's connect / disconnect / reconnect events."""
    return [e for e in events if e.get("kind") in CONNECTION_KINDS]


def run_metrics(results: Mapping[str, Any], events: Sequence[Event]) -> dict[str, float | None]:
    """The figures two runs are compared on; larger is worse for every one of them."""
    timings = results.get("timings") or {}
    up_t = timings.get("upload_latency_s") or {}
    note_t = timings.get("notification_latency_s") or {}
    http_ups = [
        float(e["duration_s"])
        for e in events
        if e.get("kind") == "http_request"
        and e.get("endpoint") == "upload"
        and isinstance(e.get("duration_s"), (int, float))
    ]
    fan = [x for v in notification_fanout(events).values() for x in v]

    def pick(given: Mapping[str, Any], key: str, values: Sequence[float], q: float) -> float | None:
        # results.json's figure when the run recorded it (the terminal shows that one).
        v = given.get(key)
        return float(v) if isinstance(v, (int, float)) else percentile(values, q)

    rounds = results.get("rounds") or []
    walls = [
        float(r["wall_time_s"]) for r in rounds if isinstance(r.get("wall_time_s"), (int, float))
    ]
    rels = [
        float(r["max_rel_error"])
        for r in rounds
        if isinstance(r.get("max_rel_error"), (int, float))
    ]
    statuses = [e for e in events if e.get("kind") == "http_request"]
    bad_http = sum(
        1 for e in statuses if not (isinstance(e.get("status"), int) and e["status"] < 400)
    )
    notif = results.get("notifications") or {}
    return {
        "upload latency p50 (s)": pick(up_t, "p50", http_ups, 50),
        "upload latency p95 (s)": pick(up_t, "p95", http_ups, 95),
        "upload latency p99 (s)": pick(up_t, "p99", http_ups, 99),
        "notification latency p50 (s)": pick(note_t, "p50", fan, 50),
        "notification latency p99 (s)": pick(note_t, "p99", fan, 99),
        "round wall time mean (s)": sum(walls) / len(walls) if walls else None,
        "round wall time max (s)": max(walls) if walls else None,
        "failed checks": float(sum(1 for c in results.get("checks", []) if not c.get("passed"))),
        "max relative error": max(rels) if rels else None,
        "HTTP errors (status >= 400 or no answer)": float(bad_http),
        "HTTP retries": float(sum(1 for e in events if e.get("kind") == "retry_wait")),
        "disconnects": float(sum(1 for e in events if e.get("kind") == "disconnect")),
        "leaf errors": float(
            len((results.get("leaves") or {}).get("errors") or [])
            or sum(1 for e in events if e.get("kind") == "leaf_error")
        ),
        "notifications lost": float(notif.get("lost") or 0),
    }
