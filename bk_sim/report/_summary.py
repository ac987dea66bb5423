"""The short terminal summary printed at the end of every run: verdict first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _num(value: Any, fmt: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}{unit}"


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: verdict, a table of rounds, notifications and timings."""
    lines = [("PASSED" if results.get("passed") else "FAILED") + f"  {results.get('verdict', '')}"]
    rounds = results.get("rounds") or []
    if rounds:
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
    return lines
