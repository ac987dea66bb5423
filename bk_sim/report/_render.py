"""Render a run folder: ``junit.xml`` and ``report.html`` from its results and event log."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bk_sim.errors import ReportError
from bk_sim.files import atomic_write
from bk_sim.report._compare import Delta, compare_lines, compare_runs
from bk_sim.report._fa_section import analytics_plots, analytics_section
from bk_sim.report._html import render_html
from bk_sim.report._junit import write_junit
from bk_sim.report._load import RunData, load_run
from bk_sim.report._metrics import (
    MAX_TIMELINE_LEAVES,
    aggregate_out_times,
    connection_events,
    fault_spans,
    http_statuses,
    leaf_index_by_id,
    leaf_of,
    leaf_timeline,
    notification_fanout,
    notification_waits,
    retries_by_status,
    run_metrics,
    sample_leaves,
    throughput,
    upload_durations,
)

_log = logging.getLogger(__name__)

JUNIT = "junit.xml"
HTML = "report.html"


@dataclass(frozen=True)
class Rendered:
    """What ``render_run`` wrote, the terminal diff when it compared two runs, and the
    run's results (so a caller need not read the run folder again)."""

    junit: Path
    html: Path
    seconds: float
    compare_lines: list[str] = field(default_factory=list)
    deltas: list[Delta] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # the run's, as read for rendering


def _dur(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1000:.3g} ms"


def _plots_for(run: RunData) -> tuple[dict[str, str], dict[str, str]]:
    """Every plot's SVG and caption; a plot with nothing to show gets a sentence instead."""
    from bk_sim.report import _plots  # matplotlib loads only when a report is drawn

    ev, t0 = run.events, run.t0
    plots: dict[str, str] = {}
    notes: dict[str, str] = {}
    rounds = run.results.get("rounds") or []
    analytics = run.results.get("analytics")
    if analytics is not None:  # FA rounds have no layer errors: their columns instead
        plots.update(analytics_plots(analytics))
    elif rounds:
        plots["round_errors"] = _plots.round_error_plot(rounds)
    faults = fault_spans(ev, t0)
    names = leaf_index_by_id(ev)
    spans, marks = leaf_timeline(ev, t0)
    all_leaves = {s.leaf for s in spans} | {m.leaf for m in marks} | set(names.values())
    notable = {m.leaf for m in marks if m.kind != "notified"} | {
        leaf for f in faults for leaf in f.leaves
    }
    notable |= {
        leaf
        for e in ev
        if e.get("kind") in ("retry_wait", "reconnect_wait", "connect_failed")
        and (leaf := leaf_of(e, names)) is not None
    }
    shown = sample_leaves(all_leaves, notable)
    conn = connection_events(ev)
    starts = [s.start for s in spans] + [m.t for m in marks] + [f.start for f in faults]
    starts += [float(e["t"]) - t0 for e in conn]
    # The platform's start-up is dead air: time plots begin where the leaves do.
    x_from = max(0.0, min(starts) - 0.05 * (max(starts) - min(starts) + 1.0)) if starts else 0.0
    fault_note = (
        f" Shaded red: {len(faults)} injected fault(s) "
        f"({', '.join(sorted({f.label for f in faults}))})."
        if faults
        else ""
    )
    wide = [f for f in faults if f.run_wide]
    wide_note = (
        f" Shaded red: {len(wide)} run-wide fault(s) "
        f"({', '.join(sorted({f.label for f in wide}))}); leaf faults are on the timeline."
        if wide
        else ""
    )
    if shown:
        plots["timeline"] = _plots.timeline_plot(
            spans, marks, faults, shown, aggregate_out_times(ev, t0), x_from=x_from
        )
        sampled = (
            f"Showing {len(shown)} of {len(all_leaves)} leaves (at most {MAX_TIMELINE_LEAVES}): "
            "those with errors, deaths, skips or faults first, the rest evenly spaced."
            if len(shown) < len(all_leaves)
            else f"All {len(all_leaves)} leaves."
        )
        notes["timeline"] = (
            sampled
            + " Dotted lines R1, R2...: the first leaf hears of that round's aggregate."
            + fault_note
        )
    else:
        notes["timeline"] = "No leaf events in the log."
    ups = upload_durations(ev)
    if ups:
        plots["upload_latency"] = _plots.upload_latency_plot(ups)
        notes["upload_latency"] = (
            "Box: quartiles, whiskers 1.5 IQR; dots: single uploads (hidden past 400 a round)."
        )
    else:
        notes["upload_latency"] = "No upload finished."
    waits, fanout = notification_waits(ev), notification_fanout(ev)
    if waits or fanout:
        plots["notification_latency"] = _plots.notification_latency_plot(waits, fanout)
        nl = (run.results.get("timings") or {}).get("notification_latency_s") or {}
        if isinstance(nl.get("p50"), (int, float)) and isinstance(nl.get("p99"), (int, float)):
            notes["notification_latency"] = (
                f"From the platform's round close to a leaf notified: p50 {_dur(nl['p50'])}, "
                f"p99 {_dur(nl['p99'])} (results.json)."
            )
    else:
        notes["notification_latency"] = "No leaf was notified of an aggregate."
    up_tp, down_tp = throughput(ev, t0, "upload"), throughput(ev, t0, "download")
    if up_tp[0] or down_tp[0]:
        plots["throughput"] = _plots.throughput_plot(up_tp, down_tp, faults, x_from=x_from)
        notes["throughput"] = "Payload bytes of finished uploads and downloads." + wide_note
    else:
        notes["throughput"] = "No upload or download finished."
    statuses, retries = http_statuses(ev), retries_by_status(ev)
    if statuses:
        plots["retries"] = _plots.retries_plot(statuses, retries)
        total = sum(retries.values())
        notes["retries"] = (
            f"{sum(sum(c.values()) for c in statuses.values())} HTTP attempts, "
            f"{total} retr{'y' if total == 1 else 'ies'}."
        )
    else:
        notes["retries"] = "No HTTP requests in the log."
    lost = [e for e in conn if e.get("kind") != "connect"]
    if lost or faults:
        plots["reconnects"] = _plots.reconnect_plot(conn, t0, faults, names, x_from=x_from)
        notes["reconnects"] = (
            f"{sum(1 for e in conn if e.get('kind') == 'disconnect')} disconnects, "
            f"{sum(1 for e in conn if e.get('kind') == 'reconnect_wait')} reconnect waits, "
            f"{sum(1 for e in conn if e.get('kind') == 'connect')} connects." + wide_note
        )
    else:
        connects = sum(1 for e in conn if e.get("kind") == "connect")
        notes["reconnects"] = (
            f"No disconnects: {connects} connects, each leaf's notification transport stayed up."
            if connects
            else "No notification-transport events in the log."
        )
    memory = run.results.get("memory") or {}
    if memory.get("processes"):
        plots["memory"] = _plots.memory_plot(memory["processes"], int(memory.get("S_bytes") or 1))
        notes["memory"] = "Peaks (results.json memory): " + "; ".join(
            f"{p['name']} {p['peak_bytes'] / 2**20:.0f} MiB (+{p['growth_x_S']} x S)"
            for p in memory["processes"]
        )
    return plots, notes


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary name, so a reader never sees half a page (and a failed
    write leaves no temporary file behind)."""
    atomic_write(path, text)


def render_run(run_dir: Path | str, compare_to: Path | str | None = None) -> Rendered:
    """Write ``junit.xml`` and ``report.html`` into ``run_dir``; ``ReportError`` if not a run.

    With ``compare_to`` (another run folder, the baseline) the page gains a side-by-side
    section and ``Rendered.compare_lines`` holds the short terminal diff.
    """
    began = time.perf_counter()
    run = load_run(run_dir)
    comparison = None
    lines: list[str] = []
    deltas: list[Delta] = []
    if compare_to is not None:
        base = load_run(compare_to)
        deltas = compare_runs(base, run)
        comparison = (base, deltas)
        lines = compare_lines(base, run, deltas)
    plots, notes = _plots_for(run)
    faults = fault_spans(run.events, run.t0)
    analytics = run.results.get("analytics")
    page = render_html(
        run,
        names=leaf_index_by_id(run.events),
        metrics=run_metrics(run.results, run.events),
        plots=plots,
        notes=notes,
        comparison=comparison,
        faults=faults,
        rounds_html=None
        if analytics is None
        else analytics_section(analytics, run.results.get("rounds") or [], plots),
    )
    html_path = run.dir / HTML
    junit = run.dir / JUNIT
    try:
        write_junit(run.results, junit)
        _write_atomic(html_path, page)
    except OSError as exc:
        raise ReportError(f"{run.dir}: cannot write the report ({exc})") from exc
    took = time.perf_counter() - began
    _log.info("rendered %s and %s in %.2f s", junit, html_path, took)
    return Rendered(junit, html_path, took, lines, deltas, run.results)
