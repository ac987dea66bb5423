"""What the faults did, from the run's event log and the platform's round records.

Per fault and per leaf: time to detect the loss (fault start -> ``disconnect``), time to
reconnect (``disconnect`` -> next ``connect``), the attempts and the waits between them
(each ``reconnect_wait`` checked against ``min(factor ** n, max_delay)``), HTTP retries by
status; over the run: notifications lost, duplicated or late (a leaf killed and started
again is owed only what closed while one of its processes was alive), and uploads a round
record counts twice. ``judge_chaos`` is pure: it can be re-run on a finished run's folder.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bk_sim.client import reconnect_delay
from bk_sim.engine import Check, Judgement, RoundRecord, as_time, records_from_events
from bk_sim.scenario import Scenario

Event = Mapping[str, Any]
#: A notification this much later than its round's close (plus any platform notification
#: delay) counts as late.
LATE_AFTER_S = 2.0
#: A retry this soon after an HTTP fault ended still answers a request the fault hit.
_HTTP_RETRY_GRACE_S = 2.0
#: Fault kinds that act on the leaves' notification connections.
DISCONNECTING = (
    "kill_connections", "close_channel", "restart_broker",
    "latency", "bandwidth", "blackhole", "reset_peer", "slow_close",
)  # fmt: skip

#: Fault kinds that must show up as a disconnect of the leaves they hit.
_DISCONNECTING_KINDS = ("kill_connections", "close_channel", "restart_broker", "reset_peer")


@dataclasses.dataclass(frozen=True)
class FaultSpan:
    """What one scheduled fault was, from its ``fault_*`` events."""

    name: str
    kind: str | None
    target: Any = None
    round: int | None = None
    start_t: float | None = None
    end_t: float | None = None
    leaves: tuple[int, ...] = ()
    injected: bool = False
    error: str | None = None
    http: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class FaultVerdict:
    """What one fault did: who lost the connection, how fast they noticed and came back,
    what it cost in retries and notifications. ``to_dict`` is its results.json entry."""

    span: FaultSpan
    per_leaf: tuple[Mapping[str, Any], ...] = ()
    #: None: the fault never started, so nothing was measured
    disconnected: int | None = None
    reconnected: int | None = None
    detect_s: Mapping[str, Any] | None = None
    reconnect_s: Mapping[str, Any] | None = None
    rounds_closed_during: int | None = None
    http_retries: Mapping[str, int] | None = None
    retrying_leaves: Mapping[int, int] | None = None
    notifications: Mapping[str, Any] | None = None
    retried_uploads: tuple[Mapping[str, Any], ...] | None = None

    @property
    def name(self) -> str:
        return self.span.name

    def to_dict(self) -> dict[str, Any]:
        s = self.span
        d: dict[str, Any] = {
            "name": s.name,
            "kind": s.kind,
            "target": s.target,
            "round": s.round,
            "start_t": s.start_t,
            "end_t": s.end_t,
            "leaves": list(s.leaves),
            "injected": s.injected,
            "error": s.error,
        }
        if s.http is not None or s.start_t is not None:
            d["http"] = None if s.http is None else dict(s.http)
        d["per_leaf"] = [dict(p) for p in self.per_leaf]
        measured = {
            "disconnected": self.disconnected,
            "reconnected": self.reconnected,
            "detect_s": self.detect_s,
            "reconnect_s": self.reconnect_s,
            "http_retries": None if self.http_retries is None else dict(self.http_retries),
            "retrying_leaves": None if self.retrying_leaves is None else dict(self.retrying_leaves),
            "rounds_closed_during": self.rounds_closed_during,
            "notifications": self.notifications,
            "retried_uploads": None
            if self.retried_uploads is None
            else [dict(u) for u in self.retried_uploads],
        }
        d.update({k: v for k, v in measured.items() if v is not None})
        return d


@dataclasses.dataclass(frozen=True)
class _Wait:
    """A leaf's wait before a reconnect attempt, as its event logged it."""

    attempt: int  # 1-based: what reconnect_delay takes
    delay_s: float


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "p50": float(np.percentile(arr, 50)), "max": float(arr.max())}


def detection_window_s(scenario: Scenario) -> float:
    """How long after a fault ends a disconnect may still be its doing: pika notices a
    stalled peer after one to two heartbeat checks (heartbeat + 5 s each)."""
    hb = scenario.client.reconnect.heartbeat
    return 2.0 * (hb + 5.0) + 2.0 if hb > 0 else 30.0


def judge_chaos(
    scenario: Scenario,
    events: Sequence[Event],
    records: Sequence[RoundRecord] | None,
    judgement: Judgement | None = None,
) -> tuple[list[Check], dict[str, Any]]:
    """The chaos checks (from ``chaos.expect``) and the results.json ``chaos`` section."""
    names = {int(e["leaf"]): str(e["leaf_id"]) for e in events if "leaf" in e and "leaf_id" in e}
    by_leaf: dict[int, list[Event]] = defaultdict(list)
    for e in events:
        if "leaf" in e and isinstance(e.get("leaf"), int):
            by_leaf[int(e["leaf"])].append(e)
    rc = scenario.client.reconnect
    window = detection_window_s(scenario)
    violations: list[dict[str, Any]] = []
    slow: list[tuple[float, str]] = []
    never: list[str] = []
    detects: list[float] = []
    verdicts = [
        _per_fault(f, by_leaf, names, rc, window, events, records, violations, slow, never)
        for f in _faults(events)
    ]
    for v in verdicts:
        detects += [p["detect_s"] for p in v.per_leaf if p.get("detect_s") is not None]
    # Without the platform's records (a remote platform without its admin API), the
    # aggregates the leaves heard of stand in for the notifications owed.
    notes = _notifications(
        scenario, events, records if records is not None else records_from_events(events)
    )
    confirmed = {str(e["file_id"]) for e in events if e.get("kind") == "upload"}
    doubles = _double_counted(records or [], names, confirmed)
    for i, v in enumerate(verdicts):
        if v.span.start_t is None:
            continue
        v = dataclasses.replace(v, notifications=_fault_notifications(notes, v.span, window))
        if v.span.kind == "http":
            retried = _retried_uploads(v.span, by_leaf, records or [], confirmed)
            v = dataclasses.replace(v, retried_uploads=tuple(retried))
        verdicts[i] = v
    killed = [
        {
            "leaf": e["leaf"],
            "leaf_id": e.get("leaf_id"),
            "round": e.get("round"),
            "process": e.get("process"),
            "reason": e.get("reason"),
        }
        for e in events
        if e.get("kind") == "leaf_died" and str(e.get("reason", "")).startswith("chaos:")
    ]
    restarted = [
        {
            "process": e.get("process"),
            "leaves": e.get("leaves"),
            "first_round": e.get("first_round"),
        }
        for e in events
        if e.get("kind") == "leaf_restarted"
    ]
    http_total: Counter[str] = Counter()
    for e in events:
        if e.get("kind") == "retry_wait" and e.get("transport") == "http":
            http_total[_retry_key(e)] += 1
    notes.pop("_pairs", None)
    section: dict[str, Any] = {
        "faults": [v.to_dict() for v in verdicts],
        "notifications": notes,
        "uploads": {"double_counted": doubles},
        "http_retries": dict(http_total),
        "killed": killed,
        "restarted": restarted,
        "backoff_violations": violations[:50],
        "detect_s": _stats(detects),
        "reconnect_s": _stats([s for s, _ in slow]),
    }
    checks = _checks(
        scenario, verdicts, notes, doubles, violations, slow, never, detects, judgement, records
    )
    return checks, section


def _faults(events: Sequence[Event]) -> list[FaultSpan]:
    """Each scheduled fault as its events tell it, in the order they first appear."""
    out: dict[str, FaultSpan] = {}
    for e in events:
        kind = e.get("kind")
        if kind not in ("fault_start", "fault_end", "fault_error", "fault_skipped"):
            continue
        name = str(e.get("fault"))
        f = out.setdefault(
            name,
            FaultSpan(name, e.get("fault_kind"), target=e.get("target"), round=e.get("round")),
        )
        if kind == "fault_start":
            f = dataclasses.replace(
                f,
                start_t=float(e["t"]),
                leaves=tuple(int(x) for x in e.get("leaves", [])),
                injected=True,
                round=e.get("round"),
                target=e.get("target"),
                http=e.get("http"),
            )
        elif kind == "fault_end":
            f = dataclasses.replace(f, end_t=float(e["t"]))
        elif kind == "fault_error":
            f = dataclasses.replace(
                f, error=e.get("error"), injected=f.injected if f.start_t is not None else False
            )
        else:
            f = dataclasses.replace(f, error=e.get("reason"))
        out[name] = f
    return [
        dataclasses.replace(f, end_t=f.start_t) if f.start_t is not None and f.end_t is None else f
        for f in out.values()
    ]


def _retry_key(e: Event) -> str:
    return str(e["status"]) if e.get("status") is not None else "no answer"


def _rule_key(rule: Mapping[str, Any]) -> str:
    """The retry key an HTTP fault rule causes: its status, or no answer at all."""
    if rule.get("reset") or rule.get("drop_response") or rule.get("status") is None:
        return "no answer"
    return str(rule["status"])


def _per_fault(
    f: FaultSpan,
    by_leaf: Mapping[int, Sequence[Event]],
    names: Mapping[int, str],
    rc: Any,
    window: float,
    events: Sequence[Event],
    records: Sequence[RoundRecord] | None,
    violations: list[dict[str, Any]],
    slow: list[tuple[float, str]],
    never: list[str],
) -> FaultVerdict:
    per_leaf: list[dict[str, Any]] = []
    if f.start_t is None:
        return FaultVerdict(f)
    start = f.start_t
    end = f.end_t if f.end_t is not None else start
    # Only faults on the notification path are expected to disconnect leaves.
    hit_leaves = f.leaves if f.kind in DISCONNECTING else ()
    for leaf in hit_leaves:
        evs = by_leaf.get(int(leaf), [])
        disc = next(
            (
                e
                for e in evs
                if e.get("kind") == "disconnect" and start <= float(e["t"]) <= end + window
            ),
            None,
        )
        row: dict[str, Any] = {"leaf": leaf, "leaf_id": names.get(int(leaf))}
        if disc is None:
            per_leaf.append(row | {"disconnected": False})
            continue
        t_disc = float(disc["t"])
        conn = next(
            (e for e in evs if e.get("kind") == "connect" and float(e["t"]) >= t_disc), None
        )
        t_conn = float(conn["t"]) if conn is not None else None
        upto = t_conn if t_conn is not None else float("inf")
        waits = [
            _Wait(int(e.get("attempt", 0)), float(e.get("delay_s", 0.0)))
            for e in evs
            if e.get("kind") == "reconnect_wait" and t_disc <= float(e["t"]) <= upto
        ]
        failed = sum(
            1 for e in evs if e.get("kind") == "connect_failed" and t_disc <= float(e["t"]) <= upto
        )
        ok = True
        for w in waits:
            want = reconnect_delay(w.attempt, rc.backoff_factor, rc.max_delay)
            if abs(w.delay_s - want) > 1e-6:
                ok = False
                violations.append(
                    {
                        "fault": f.name,
                        "leaf": leaf,
                        "attempt": w.attempt,
                        "delay_s": w.delay_s,
                        "expected_s": want,
                    }
                )
        row.update(
            disconnected=True,
            error=disc.get("error"),
            detect_s=t_disc - start,
            reconnect_s=None if t_conn is None else t_conn - t_disc,
            attempts=int(conn.get("attempt", 0)) if conn is not None else len(waits),
            failed_attempts=failed,
            waits=[dataclasses.asdict(w) for w in waits],
            backoff_ok=ok,
        )
        label = f"leaf {leaf} ({names.get(int(leaf))}) after {f.name}"
        if t_conn is None:
            gone = any(
                e.get("kind") in ("leaf_died", "leaf_closed", "give_up") and float(e["t"]) >= t_disc
                for e in evs
            )
            if not gone or any(e.get("kind") == "give_up" for e in evs):
                never.append(label)
        else:
            slow.append((t_conn - t_disc, label))
        per_leaf.append(row)
    hit = [p for p in per_leaf if p.get("disconnected")]
    retries: Counter[str] = Counter()
    per_leaf_retries: Counter[int] = Counter()
    rule = f.http or {}
    for e in events:
        if (
            f.kind == "http"
            and e.get("kind") == "retry_wait"
            and e.get("transport") == "http"
            and start <= float(e["t"]) <= end + _HTTP_RETRY_GRACE_S
            and rule.get("endpoint", "*") in ("*", e.get("endpoint"))
            and _retry_key(e) == _rule_key(rule)
        ):
            retries[f"{e.get('endpoint')} {_retry_key(e)}"] += 1
            if isinstance(e.get("leaf"), int):
                per_leaf_retries[int(e["leaf"])] += 1
    closed = [
        t
        for r in records or []
        if (t := as_time(r.closed_at)) is not None and start <= t <= end + window
    ]
    http = f.kind == "http"
    return FaultVerdict(
        f,
        per_leaf=tuple(per_leaf),
        disconnected=len(hit),
        reconnected=sum(1 for p in hit if p.get("reconnect_s") is not None),
        detect_s=_stats([p["detect_s"] for p in hit]),
        reconnect_s=_stats([p["reconnect_s"] for p in hit if p.get("reconnect_s") is not None]),
        rounds_closed_during=len(closed),
        http_retries=dict(retries) if http else None,
        retrying_leaves=dict(sorted(per_leaf_retries.items())) if http else None,
    )


def _notifications(
    scenario: Scenario, events: Sequence[Event], records: Sequence[RoundRecord]
) -> dict[str, Any]:
    spans: dict[str, list[list[float]]] = defaultdict(list)
    got: Counter[tuple[str, int, str]] = Counter()
    first: dict[tuple[str, str], float] = {}
    for e in events:
        kind, leaf = e.get("kind"), e.get("leaf_id")
        if leaf is None:
            continue
        leaf = str(leaf)
        if kind == "leaf_started":
            if not spans[leaf] or spans[leaf][-1][1] != float("inf"):
                spans[leaf].append([float(e["t"]), float("inf")])
        elif kind in ("leaf_closed", "leaf_died") and spans[leaf]:
            last = spans[leaf][-1]
            last[1] = min(last[1], float(e["t"]))
        elif kind == "notification" and e.get("message_type") == "aggregation_status":
            agg = str(e.get("value"))
            got[(leaf, len(spans[leaf]), agg)] += 1
            first.setdefault((leaf, agg), float(e["t"]))
    closed = {
        r.aggregation_id: as_time(r.closed_at) for r in records if r.aggregated and r.aggregation_id
    }
    expected = {
        (leaf, agg)
        for agg, t in closed.items()
        for leaf, ss in spans.items()
        if t is None or any(a <= t <= b for a, b in ss)
    }
    lost = sorted(pair for pair in expected if pair not in first)
    duplicates = sum(n - 1 for n in got.values() if n > 1)
    delay = scenario.platform.faults.notifications.delay_s
    late = [
        (first[pair] - t, pair)
        for pair in expected
        if pair in first
        and (t := closed.get(pair[1])) is not None
        and first[pair] - t > LATE_AFTER_S + delay
    ]
    pairs = [
        {
            "leaf_id": leaf,
            "aggregation_id": agg,
            "closed_t": closed.get(agg),
            "delivered_t": first.get((leaf, agg)),
            "copies": sum(n for (lf, _, a), n in got.items() if lf == leaf and a == agg),
        }
        for leaf, agg in sorted(expected)
    ]
    return {
        "_pairs": pairs,
        "expected": len(expected),
        "received": len(expected) - len(lost),
        "lost": len(lost),
        "duplicates": duplicates,
        "late": len(late),
        "late_after_s": LATE_AFTER_S + delay,
        "max_delivery_s": max(
            (first[p] - t for p in expected if p in first and (t := closed.get(p[1])) is not None),
            default=None,
        ),
        "lost_examples": [{"leaf_id": a, "aggregation_id": b} for a, b in lost[:10]],
        "late_examples": [
            {"leaf_id": a, "aggregation_id": b, "after_s": d} for d, (a, b) in sorted(late)[-10:]
        ],
    }


def _fault_notifications(notes: Mapping[str, Any], f: FaultSpan, window: float) -> dict[str, Any]:
    """Notifications of the aggregates that closed while the fault (or its aftermath)
    lasted: how many were owed, lost, handled twice, late, and the slowest delivery."""
    assert f.start_t is not None and f.end_t is not None
    start, end = f.start_t, f.end_t
    late_after = float(notes["late_after_s"])
    mine = [
        p
        for p in notes["_pairs"]
        if p["closed_t"] is not None and start <= p["closed_t"] <= end + window
    ]
    delays = [p["delivered_t"] - p["closed_t"] for p in mine if p["delivered_t"] is not None]
    return {
        "expected": len(mine),
        "lost": sum(1 for p in mine if p["delivered_t"] is None),
        "duplicated": sum(max(0, p["copies"] - 1) for p in mine),
        "late": sum(1 for d in delays if d > late_after),
        "max_delivery_s": max(delays, default=None),
    }


def _retried_uploads(
    f: FaultSpan,
    by_leaf: Mapping[int, Sequence[Event]],
    records: Sequence[RoundRecord],
    confirmed: set[str],
) -> list[dict[str, Any]]:
    """Each upload an HTTP fault made a leaf retry: the round it landed in and how many
    times the platform's records count that leaf there (1 is right)."""
    assert f.start_t is not None and f.end_t is not None
    start, end = f.start_t, f.end_t + _HTTP_RETRY_GRACE_S
    out = []
    for leaf, evs in sorted(by_leaf.items()):
        retry_t = next(
            (
                float(e["t"])
                for e in evs
                if e.get("kind") == "retry_wait"
                and e.get("endpoint") == "upload"
                and start <= float(e["t"]) <= end
            ),
            None,
        )
        if retry_t is None:
            continue
        up = next((e for e in evs if e.get("kind") == "upload" and float(e["t"]) >= retry_t), None)
        if up is None:
            out.append({"leaf": leaf, "round": None, "counted": None, "file_id": None})
            continue
        leaf_id = str(up["leaf_id"])
        landed = next(
            (r for r in records if any(u.file_id == up["file_id"] for u in r.uploads)),
            None,
        )
        counted = 0
        if landed is not None:
            number = landed.round
            for r in records:
                same = r is landed
                for u in r.uploads:
                    if u.leaf_id != leaf_id:
                        continue
                    unconfirmed = u.file_id not in confirmed
                    if same or (unconfirmed and r.round in (number - 1, number + 1)):
                        counted += 1
        out.append(
            {"leaf": leaf, "round": up.get("round"), "file_id": up["file_id"], "counted": counted}
        )
    return out


def _double_counted(
    records: Sequence[RoundRecord],
    names: Mapping[int, str],
    confirmed: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Uploads the platform counted more than once: a leaf twice in one round, or an
    upload the leaf never saw confirmed (a retried request also kept, perhaps in the
    next round) next to the one it did see. ``confirmed``: file ids of upload events."""
    index = {v: k for k, v in names.items()}
    out: list[dict[str, Any]] = []
    seen: set[tuple[Any, str]] = set()
    for rec in records:
        counts = Counter(u.leaf_id for u in rec.uploads)
        for leaf_id, n in sorted(counts.items()):
            if n > 1:
                seen.add((rec.round, leaf_id))
                out.append(
                    {
                        "round": rec.round,
                        "leaf": index.get(leaf_id),
                        "leaf_id": leaf_id,
                        "count": n,
                    }
                )
    if confirmed is None:
        return out
    per_leaf: Counter[str] = Counter(u.leaf_id for rec in records for u in rec.uploads)
    for rec in records:
        for u in rec.uploads:
            leaf_id, file_id = u.leaf_id, u.file_id
            if file_id in confirmed or (rec.round, leaf_id) in seen:
                continue
            if leaf_id not in index:
                continue  # not one of this run's leaves: the round check reports it
            seen.add((rec.round, leaf_id))
            out.append(
                {
                    "round": rec.round,
                    "leaf": index.get(leaf_id),
                    "leaf_id": leaf_id,
                    "count": 2,
                    "unconfirmed_file_id": file_id,
                    "uploads_recorded": per_leaf[leaf_id],
                }
            )
    return out


def _checks(
    scenario: Scenario,
    faults: Sequence[FaultVerdict],
    notes: Mapping[str, Any],
    doubles: Sequence[Mapping[str, Any]],
    violations: Sequence[Mapping[str, Any]],
    slow: Sequence[tuple[float, str]],
    never: Sequence[str],
    detects: Sequence[float],
    judgement: Judgement | None,
    records: Sequence[RoundRecord] | None,
) -> list[Check]:
    x = scenario.chaos.expect
    checks: list[Check] = []
    planned = len(scenario.chaos.faults)
    bad = [f.span for f in faults if not f.span.injected or f.span.error]
    checks.append(
        Check(
            "chaos: every scheduled fault was injected",
            len(faults) == planned and not bad,
            "; ".join(f"{f.name}: {f.error or 'not injected'}" for f in bad)
            or f"{len([f for f in faults if f.span.injected])} of {planned} injected",
        )
    )
    # A connection fault that disconnected nobody (it landed after the leaves were done,
    # or never reached them) proves nothing about reconnects: say so instead of passing.
    idle = [
        f.name
        for f in faults
        if f.span.kind in _DISCONNECTING_KINDS and f.span.injected and not f.disconnected
    ]
    if any(f.span.kind in _DISCONNECTING_KINDS for f in faults):
        checks.append(
            Check(
                "chaos: every connection fault disconnected at least one leaf",
                not idle,
                f"no leaf lost its connection to: {', '.join(idle)} (did it land after the "
                "leaves finished?)"
                if idle
                else "",
            )
        )
    if x.lost_notifications is not None:
        ex = ", ".join(
            f"{d['leaf_id']} missed {d['aggregation_id']}" for d in notes["lost_examples"][:3]
        )
        checks.append(
            Check(
                f"chaos: at most {x.lost_notifications} notifications lost",
                notes["lost"] <= x.lost_notifications,
                f"{notes['lost']} lost of {notes['expected']} expected"
                + (f" ({ex})" if ex else ""),
            )
        )
    if x.duplicate_notifications is not None:
        checks.append(
            Check(
                f"chaos: at most {x.duplicate_notifications} notifications handled twice",
                notes["duplicates"] <= x.duplicate_notifications,
                f"{notes['duplicates']} duplicated",
            )
        )
    if x.max_reconnect_s is not None:
        worst = max(slow, default=None)
        over = [label for s, label in slow if s > x.max_reconnect_s]
        msg = f"worst {worst[0]:.2f} s ({worst[1]})" if worst else "no leaf disconnected"
        if never:
            msg = f"never reconnected: {', '.join(never[:3])}; " + msg
        elif over:
            msg = f"{len(over)} over the bound; " + msg
        checks.append(
            Check(
                f"chaos: every disconnected leaf reconnected within {x.max_reconnect_s:g} s",
                not never and not over,
                msg,
            )
        )
    if x.max_detect_s is not None:
        worst_detect = max(detects, default=None)
        checks.append(
            Check(
                f"chaos: every loss detected within {x.max_detect_s:g} s",
                worst_detect is not None and worst_detect <= x.max_detect_s,
                "no disconnect seen" if worst_detect is None else f"worst {worst_detect:.2f} s",
            )
        )
    if x.backoff:
        v = violations[0] if violations else None
        checks.append(
            Check(
                "chaos: reconnect waits follow min(factor^n, max_delay)",
                not violations,
                ""
                if v is None
                else f"{len(violations)} off, e.g. leaf {v['leaf']} attempt "
                f"{v['attempt']} waited {v['delay_s']} s, expected {v['expected_s']} s",
            )
        )
    if x.aggregates == "correct":
        rows = list(judgement.rounds) if judgement is not None else []
        failing = [r for r in rows if not r.passed]
        checks.append(
            Check(
                "chaos: every aggregate correct despite the faults",
                bool(rows) and not failing,
                "; ".join(f"round {r.round}: {r.reason}" for r in failing[:3])
                or ("no round closed" if not rows else f"{len(rows)} rounds validated"),
            )
        )
    if x.duplicate_uploads is not None:
        # Only the platform's round records say what it counted: without them the check
        # cannot be made, and a check not made must not pass.
        checks.append(
            Check(
                f"chaos: at most {x.duplicate_uploads} uploads counted twice",
                records is not None and len(doubles) <= x.duplicate_uploads,
                "; ".join(
                    f"round {d['round']}: leaf {d['leaf']} ({d['leaf_id']}) "
                    f"counted {d['count']} times"
                    for d in doubles[:3]
                )
                or (
                    "cannot be judged: no round records from the platform (a local platform, "
                    "or platform.admin_url and admin_token, provide them)"
                    if records is None
                    else "each leaf counted once per round"
                ),
            )
        )
    return checks
