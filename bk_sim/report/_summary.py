"""The short terminal summary printed at the end of every run: verdict first."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _num(value: Any, fmt: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}{unit}"


def headline(results: Mapping[str, Any]) -> str:
    """The verdict in one sentence: what passed, or the first failure and how many more.

    The terminal summary and the HTML report both lead with it, so they never disagree.
    """
    checks = list(results.get("checks") or [])
    failed = [c for c in checks if not c.get("passed")]
    if not results.get("passed"):
        if not failed:
            return str(results.get("verdict") or "the run failed")
        first = failed[0]
        msg = str(first.get("message") or "").strip()
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        text = f"{len(failed)} of {len(checks)} checks failed; first: {first.get('name')}"
        return text + (f": {msg}" if msg else "") + more
    parts = []
    rounds = results.get("rounds") or []
    if rounds:
        ok = sum(1 for r in rounds if r.get("passed"))
        parts.append(f"{ok} of {len(rounds)} rounds aggregated correctly")
    n = results.get("notifications") or {}
    if n.get("expected"):
        parts.append(f"{n.get('received', 0)} of {n['expected']} notifications arrived")
    lv = results.get("leaves") or {}
    if lv.get("count"):
        died = lv.get("died_as_planned") or 0
        extra = f" ({died} died as planned)" if died else ""
        parts.append(f"{lv.get('completed', 0)} of {lv['count']} leaves finished{extra}")
    text = f"all {len(checks)} checks passed"
    return text + (": " + ", ".join(parts) if parts else "")


def _analytics_rounds(
    rounds: list[Mapping[str, Any]], analytics: list[Mapping[str, Any]]
) -> list[str]:
    """Federated analytics: checks made and failed per round instead of layer errors."""
    verdicts = {a.get("round"): a.get("verdict") or {} for a in analytics}
    lines = [
        f"{'round':>5}  {'ok':<4} {'uploads':>7}  {'checks':>7}  {'failed':>6}  "
        f"{'wall s':>7}  detail"
    ]
    for r in rounds:
        v = verdicts.get(r.get("round")) or {}
        checks = v.get("checks")
        failed = len(v.get("findings") or []) if v else None
        detail = "" if r.get("passed") else (r.get("reason") or "")
        lines.append(
            f"{r.get('round')!s:>5}  {'yes' if r.get('passed') else 'NO':<4} "
            f"{r.get('uploads', 0):>7}  {_num(checks, 'd'):>7}  {_num(failed, 'd'):>6}  "
            f"{_num(r.get('wall_time_s'), '.2f'):>7}  {detail}"
        )
    return lines


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: verdict, a table of rounds, notifications and timings."""
    lines = [("PASSED" if results.get("passed") else "FAILED") + f"  {headline(results)}"]
    rounds = results.get("rounds") or []
    if rounds and results.get("analytics") is not None:
        lines.append("")
        lines.extend(_analytics_rounds(rounds, results["analytics"]))
    elif rounds:
        lines.append("")
        lines.append(
            f"{'round':>5}  {'ok':<4} {'uploads':>7}  {'max abs err':>11}  {'max rel err':>11}  "
            f"{'wall s':>7}  detail"
        )
        for r in rounds:
            detail = "" if r.get("passed") else (r.get("reason") or "")
            lines.append(
                f"{r.get('round')!s:>5}  {'yes' if r.get('passed') else 'NO':<4} "
                f"{r.get('uploads', 0):>7}  {_num(r.get('max_abs_error')):>11}  "
                f"{_num(r.get('max_rel_error')):>11}  {_num(r.get('wall_time_s'), '.2f'):>7}  "
                f"{detail}"
            )
    n = results.get("notifications") or {}
    if n:
        lines.append("")
        lines.append(
            f"notifications: {n.get('received', 0)}/{n.get('expected', 0)} received, "
            f"{n.get('lost', 0)} lost, {n.get('duplicates', 0)} duplicates"
        )
    t = results.get("timings") or {}
    if t:
        up = t.get("upload_latency_s") or {}
        nl = t.get("notification_latency_s") or {}
        lines.append(
            "upload latency p50/p95/p99: "
            + "/".join(_num(up.get(k), ".3f") for k in ("p50", "p95", "p99"))
            + " s;  notification latency p50/p99: "
            + "/".join(_num(nl.get(k), ".3f") for k in ("p50", "p99"))
            + " s"
        )
        lines.append(
            f"leaves connected after {_num(t.get('leaves_connected_s'), '.2f')} s;  "
            f"harness share of a round {_num(t.get('harness_share'), '.1%')};  "
            f"validation {_num(t.get('validation_s'), '.2f')} s"
        )
    failed = [c for c in results.get("checks", []) if not c.get("passed")]
    if failed:
        lines.append("")
        lines.extend(f"check failed: {c['name']}: {c.get('message', '')}" for c in failed)
    run = results.get("run") or {}
    if run.get("dir"):
        lines.append(f"run folder: {run['dir']}")
        page = Path(run["dir"]) / "report.html"
        if page.is_file():
            lines.append(f"report: {page} (re-render: bk-sim report {run['dir']})")
    return lines
