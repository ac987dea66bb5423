"""One scenario run once per client implementation (``--clients``), side by side.

``write_comparison`` reads each run's folder (results.json, events.jsonl) and writes
``comparison.json`` and ``report.html`` with a column per implementation. Every row says
whether the implementations differed and gives the evidence: the events.jsonl line
numbers of what made the figure (1-based), and the fault times, relative to each run's
start. It describes; it does not judge: the runs' own checks are the verdicts.
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bk_sim.errors import ReportError
from bk_sim.files import atomic_write
from bk_sim.report._load import RunData, load_run

COMPARISON_JSON = "comparison.json"
COMPARISON_HTML = "report.html"
_EVIDENCE = 6


@dataclass(frozen=True)
class ComparedRun:
    """One implementation's run: its folder (None when it could not be made) and exit code."""

    label: str
    run_dir: Path | None
    exit_code: int
    error: str | None = None


@dataclass(frozen=True)
class _Cell:
    value: Any
    shown: str
    evidence: tuple[str, ...] = ()


def write_comparison(out_dir: Path, runs: Sequence[ComparedRun], title: str = "") -> Path:
    """Write ``comparison.json`` and ``report.html`` into ``out_dir``; the JSON's path."""
    loaded: dict[str, RunData | None] = {}
    for r in runs:
        data = None
        if r.run_dir is not None and (r.run_dir / "results.json").exists():
            try:
                data = load_run(r.run_dir)
            except ReportError:
                data = None
        loaded[r.label] = data
    labels = [r.label for r in runs]
    rows = []
    for name, measure in _ROWS:
        cells = {
            label: (measure(run) if run is not None else _Cell(None, "no run"))
            for label, run in loaded.items()
        }
        rows.append(_row(name, labels, cells))
    doc: dict[str, Any] = {
        "title": title,
        "implementations": labels,
        "runs": {
            r.label: {
                "run_dir": None if r.run_dir is None else str(r.run_dir),
                "exit_code": r.exit_code,
                "passed": r.exit_code == 0,
                "error": r.error,
                "verdict": _verdict(loaded[r.label]),
            }
            for r in runs
        },
        "rows": rows,
        "unobservable": {
            label: _unobservable(run) for label, run in loaded.items() if run is not None
        },
        "faults": {label: _fault_times(run) for label, run in loaded.items() if run is not None},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / COMPARISON_JSON
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write(out_dir / COMPARISON_HTML, _html(doc))
    return path


def _verdict(run: RunData | None) -> Any:
    return None if run is None else run.results.get("verdict")


def comparison_lines(doc_path: Path) -> list[str]:
    """The terminal's view of a comparison: one line per row, a column per implementation."""
    doc = json.loads(doc_path.read_text(encoding="utf-8"))
    labels: list[str] = doc["implementations"]
    width = max(14, *(len(x) for x in labels))
    lines = ["", "comparison: " + "  ".join(x.ljust(width) for x in labels)]
    for row in doc["rows"]:
        cells = "  ".join(str(row["shown"][x])[:width].ljust(width) for x in labels)
        mark = " *" if row["differs"] else ""
        lines.append(f"  {row['name']:<26} {cells}{mark}")
    lines.append(f"  (* differs)  {doc_path}")
    return lines


# --------------------------------------------------------------------------- rows


def _row(name: str, labels: Sequence[str], cells: Mapping[str, _Cell]) -> dict[str, Any]:
    values = {x: cells[x].value for x in labels}
    comparable = [v for v in values.values() if v is not None]
    differs = len({json.dumps(v, sort_keys=True) for v in comparable}) > 1
    what = (
        "; ".join(f"{x}: {cells[x].shown}" for x in labels)
        if differs
        else ("the same in every run" if comparable else "not measured")
    )
    return {
        "name": name,
        "values": values,
        "shown": {x: cells[x].shown for x in labels},
        "differs": differs,
        "what_differed": what,
        "evidence": {x: list(cells[x].evidence) for x in labels},
    }


def _lines(run: RunData, keep: Callable[[Mapping[str, Any]], bool]) -> list[str]:
    """``events.jsonl:N +T s kind leaf ...`` for matching events (1-based line numbers of
    the parsed log, which skips no valid line)."""
    out = []
    for n, e in enumerate(run.events, start=1):
        if keep(e):
            out.append(_line(run, n, e))
            if len(out) >= _EVIDENCE:
                break
    return out


def _line(run: RunData, n: int, e: Mapping[str, Any]) -> str:
    rel = float(e.get("t", run.t0)) - run.t0
    bits = [f"events.jsonl:{n}", f"+{rel:.2f}s", str(e.get("kind"))]
    if "leaf" in e:
        bits.append(f"leaf {e['leaf']}")
    for key in ("round", "value", "aggregation_id", "error", "status", "endpoint", "delay_s"):
        if e.get(key) is not None:
            bits.append(f"{key}={str(e[key])[:120]}")
    return " ".join(bits)


def _checks(run: RunData) -> _Cell:
    checks = run.results.get("checks") or []
    ok = sum(1 for c in checks if c.get("passed"))
    failed = [f"{c['name']}: {c.get('message', '')}"[:300] for c in checks if not c.get("passed")]
    return _Cell(f"{ok}/{len(checks)}", f"{ok}/{len(checks)}", tuple(failed))


def _notes(run: RunData) -> Mapping[str, Any]:
    chaos = run.results.get("chaos") or {}
    return chaos.get("notifications") or run.results.get("notifications") or {}


#: What can take a leaf's notifications away, most telling first.
_LOSS_KINDS = (
    "consumer_stopped",
    "give_up",
    "published_notification_dropped",
    "published_notification_blocked",
    "leaf_error",
    "disconnect",
)


def _lost(run: RunData) -> _Cell:
    n = _notes(run)
    lost = n.get("lost")
    examples = n.get("lost_examples") or []
    index = {str(e["leaf_id"]): e["leaf"] for e in run.events if "leaf" in e and "leaf_id" in e}
    leaves = {str(x.get("leaf_id")) for x in examples}
    ev = [
        f"lost: leaf {index.get(str(x.get('leaf_id')), x.get('leaf_id'))} aggregate "
        f"{x.get('aggregation_id')}"
        for x in examples
    ]
    for kind in _LOSS_KINDS:  # the lost leaves' telling events first, disconnects last
        if len(ev) >= 2 * _EVIDENCE:
            break
        ev += _lines(run, _of_leaves(kind, leaves))
    return _Cell(lost, _count(lost, n.get("expected"), "owed"), tuple(ev[: 2 * _EVIDENCE]))


def _of_leaves(kind: str, leaves: set[str]) -> Callable[[Mapping[str, Any]], bool]:
    return lambda e: e.get("kind") == kind and str(e.get("leaf_id")) in leaves


def _duplicated(run: RunData) -> _Cell:
    n = _notes(run)
    seen: Counter[tuple[str, str]] = Counter()

    def again(e: Mapping[str, Any]) -> bool:
        if e.get("kind") != "notification" or e.get("message_type") != "aggregation_status":
            return False
        key = (str(e.get("leaf_id")), str(e.get("value")))
        seen[key] += 1
        return seen[key] > 1

    dup = n.get("duplicates")
    return _Cell(dup, _count(dup), tuple(_lines(run, again)))


def _late(run: RunData) -> _Cell:
    n = _notes(run)
    late = n.get("late")
    if late is None:
        return _Cell(None, "- (chaos only)")
    ev = [
        f"late: leaf {x.get('leaf_id')} aggregate {x.get('aggregation_id')} after "
        f"{float(x.get('after_s', 0)):.2f} s"
        for x in n.get("late_examples") or []
    ]
    return _Cell(late, f"{late} (> {float(n.get('late_after_s', 0)):g} s)", tuple(ev))


def _reconnect(run: RunData) -> _Cell:
    chaos = run.results.get("chaos")
    events = run.events
    if chaos is not None:
        stats = chaos.get("reconnect_s") or {}
        value = stats.get("max")
        shown = (
            f"p50 {stats['p50']:.2f} s, max {stats['max']:.2f} s (n={stats['n']})"
            if value is not None
            else "no reconnect measured"
        )
        ev = []
        for f in chaos.get("faults") or []:
            rs = f.get("reconnect_s") or {}
            start = f.get("start_t")
            at = f"+{float(start) - run.t0:.2f}s" if start is not None else "never started"
            ev.append(
                f"fault {f.get('name')} ({f.get('kind')}) at {at}: disconnected "
                f"{f.get('disconnected', '-')}, reconnected {f.get('reconnected', '-')}, "
                f"max {_num(rs.get('max'))} s"
            )
        return _Cell(None if value is None else round(float(value), 2), shown, tuple(ev))
    drops = sum(1 for e in events if e.get("kind") == "disconnect")
    return _Cell(None, f"{drops} disconnects (no faults)", tuple(_lines(run, _kind("disconnect"))))


def _retries(run: RunData) -> _Cell:
    http = sum(
        1 for e in run.events if e.get("kind") == "retry_wait" and e.get("transport") == "http"
    )
    waits = sum(1 for e in run.events if e.get("kind") == "reconnect_wait")
    ev = _lines(run, lambda e: e.get("kind") in ("retry_wait", "reconnect_wait"))
    return _Cell(
        {"http": http, "reconnect_waits": waits},
        f"{http} HTTP, {waits} reconnect waits",
        tuple(ev),
    )


def _doubles(run: RunData) -> _Cell:
    chaos = run.results.get("chaos")
    if chaos is None:
        return _Cell(None, "- (chaos only)")
    doubles = (chaos.get("uploads") or {}).get("double_counted") or []
    ev = [
        f"round {d.get('round')}: leaf {d.get('leaf')} counted {d.get('count')} times"
        for d in doubles[:_EVIDENCE]
    ]
    return _Cell(len(doubles), str(len(doubles)), tuple(ev))


_ERROR_KINDS = ("leaf_error", "give_up", "worker_exit", "fault_error")


def _is_error(e: Mapping[str, Any]) -> bool:
    """Errors of either client: a ``consumer_stopped`` is one only with an ``error`` (ours
    reports a consumer that ended because the client closed, without one); a process or
    runner exit only when it was not killed on purpose."""
    kind = e.get("kind")
    if kind == "worker_exit" and e.get("exitcode") == -9:
        return False  # SIGKILLed on purpose: chaos's kill_leaf or a planned dropout
    if kind in _ERROR_KINDS:
        return True
    if kind == "consumer_stopped":
        return bool(e.get("error"))
    if kind == "published_runner_exited":
        return e.get("returncode") not in (0, None) and not e.get("killed")
    return False


def _errors(run: RunData) -> _Cell:
    counts = Counter(str(e.get("kind")) for e in run.events if _is_error(e))
    shown = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "0"
    return _Cell(sum(counts.values()), shown, tuple(_lines(run, _is_error)))


def _wall(run: RunData) -> _Cell:
    seconds = (run.results.get("run") or {}).get("duration_s")
    if seconds is None:
        return _Cell(None, "-")
    # Wall time always differs a little: compare it rounded to whole seconds.
    return _Cell(round(float(seconds)), f"{float(seconds):.1f} s")


_ROWS: tuple[tuple[str, Callable[[RunData], _Cell]], ...] = (
    ("checks passed", _checks),
    ("notifications lost", _lost),
    ("notifications duplicated", _duplicated),
    ("notifications late", _late),
    ("reconnect time", _reconnect),
    ("retries", _retries),
    ("uploads counted twice", _doubles),
    ("errors", _errors),
    ("wall time", _wall),
)


def _kind(kind: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda e: e.get("kind") == kind


def _count(value: Any, of: Any = None, what: str = "") -> str:
    if value is None:
        return "-"
    return f"{value} of {of} {what}".strip() if of is not None else str(value)


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def _unobservable(run: RunData) -> list[dict[str, Any]]:
    out = []
    for name, impl in (run.results.get("implementations") or {}).items():
        for item in impl.get("unobservable") or []:
            out.append({"implementation": name, **item})
    return out


def _fault_times(run: RunData) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    spans: dict[str, dict[str, Any]] = defaultdict(dict)
    for e in run.events:
        if e.get("kind") in ("fault_start", "fault_end"):
            spans[str(e.get("fault"))][str(e["kind"])] = float(e["t"]) - run.t0
            spans[str(e.get("fault"))]["kind"] = e.get("fault_kind")
    for name, s in spans.items():
        out.append(
            {
                "fault": name,
                "kind": s.get("kind"),
                "start_s": s.get("fault_start"),
                "end_s": s.get("fault_end"),
            }
        )
    return out


# --------------------------------------------------------------------------- HTML


def _html(doc: Mapping[str, Any]) -> str:
    e = html.escape
    labels: list[str] = doc["implementations"]
    head = "".join(f"<th>{e(x)}</th>" for x in labels)
    runs = doc["runs"]
    body = [
        "<tr><th>run</th>"
        + "".join(
            f"<td>exit {runs[x]['exit_code']}<br><small>{e(str(runs[x]['run_dir'] or ''))}"
            f"</small>{'<br>' + e(runs[x]['error']) if runs[x]['error'] else ''}</td>"
            for x in labels
        )
        + "<td></td></tr>"
    ]
    for row in doc["rows"]:
        cells = []
        for x in labels:
            ev = row["evidence"][x]
            details = (
                "<details><summary>evidence</summary><pre>" + e("\n".join(ev)) + "</pre></details>"
                if ev
                else ""
            )
            cells.append(f"<td>{e(str(row['shown'][x]))}{details}</td>")
        cls = ' class="differs"' if row["differs"] else ""
        body.append(
            f"<tr{cls}><th>{e(row['name'])}</th>{''.join(cells)}"
            f"<td>{e(row['what_differed'])}</td></tr>"
        )
    faults = []
    for label, spans in doc["faults"].items():
        for s in spans:
            start = "-" if s["start_s"] is None else f"+{s['start_s']:.2f} s"
            end = "-" if s["end_s"] is None else f"+{s['end_s']:.2f} s"
            faults.append(
                f"<tr><td>{e(label)}</td><td>{e(s['fault'])}</td><td>{e(str(s['kind']))}</td>"
                f"<td>{start}</td><td>{end}</td></tr>"
            )
    blind = []
    for label, items in doc["unobservable"].items():
        for item in items:
            blind.append(
                f"<tr><td>{e(label)}</td><td>{e(item.get('implementation', ''))}</td>"
                f"<td>{e(item.get('what', ''))}</td><td>{e(item.get('why', ''))}</td>"
                f"<td>{e(item.get('fills_gap', ''))}</td></tr>"
            )
    title = e(doc.get("title") or "client implementations compared")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "tr.differs th:first-child{background:#fde8c8}pre{font-size:11px;white-space:pre-wrap}"
        "</style></head><body>"
        f"<h1>{title}</h1>"
        "<p>The same scenario, once per client implementation. Rows marked in colour "
        "differ; evidence cites events.jsonl lines of each run and fault times from its "
        "start. The harness describes; each run's own checks are its verdict.</p>"
        f"<table><tr><th></th>{head}<th>what differed</th></tr>{''.join(body)}</table>"
        + (
            "<h2>Faults</h2><table><tr><th>run</th><th>fault</th><th>kind</th>"
            f"<th>start</th><th>end</th></tr>{''.join(faults)}</table>"
            if faults
            else ""
        )
        + (
            "<h2>Not observable</h2><table><tr><th>run</th><th>implementation</th>"
            "<th>what</th><th>why</th><th>what fills the gap</th></tr>"
            f"{''.join(blind)}</table>"
            if blind
            else ""
        )
        + "</body></html>\n"
    )


def implementations_html(results: Mapping[str, Any]) -> str:
    """A run page's section on its client implementations: which release each leaf ran,
    and what the harness could not observe of it ("" for a run of our client only)."""
    impls = results.get("implementations") or {}
    if not any(i.get("kind") == "published" for i in impls.values()):
        return ""
    e = html.escape
    rows = []
    blind = []
    for name, impl in impls.items():
        leaves = impl.get("leaves") or []
        shown = ", ".join(map(str, leaves[:20])) + (" ..." if len(leaves) > 20 else "")
        versions = (
            f"branchkey {impl.get('branchkey')}, numpy {impl.get('numpy')}, python "
            f"{impl.get('python')}"
            if impl.get("kind") == "published"
            else "bk-sim's own client"
        )
        rows.append(
            f"<tr><td>{e(name)}</td><td>{e(versions)}</td><td>{len(leaves)}: {e(shown)}</td></tr>"
        )
        for item in impl.get("unobservable") or []:
            blind.append(
                f"<tr><td>{e(name)}</td><td>{e(str(item.get('what', '')))}</td>"
                f"<td>{e(str(item.get('why', '')))}</td>"
                f"<td>{e(str(item.get('fills_gap', '')))}</td></tr>"
            )
    return (
        "<section><h2>Client implementations</h2><table><tr><th>implementation</th>"
        f"<th>release</th><th>leaves</th></tr>{''.join(rows)}</table>"
        "<h3>Not observable from outside the published client</h3><table><tr>"
        "<th>implementation</th><th>what</th><th>why</th><th>what fills the gap</th></tr>"
        f"{''.join(blind)}</table></section>"
    )
