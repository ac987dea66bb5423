"""Reading a run folder: ``results.json`` and ``events.jsonl`` only, never ``leaves.json``.

A report is a pure function of those two files, so any past run can be re-rendered and a
report can never leak the leaves' credentials.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bk_sim.errors import ReportError

RESULTS = "results.json"
EVENTS = "events.jsonl"


@dataclass(frozen=True)
class RunData:
    """One run as the report sees it: its folder, its results and its event log."""

    dir: Path
    results: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0  # event-log lines that were not JSON objects (a killed writer)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def t0(self) -> float:
        """Start of the run's clock: the first event (run_started when present)."""
        starts = [e["t"] for e in self.events if e.get("kind") == "run_started"]
        if starts:
            return float(starts[0])
        ts = [e["t"] for e in self.events]
        return float(min(ts)) if ts else 0.0


def load_run(run_dir: Path | str) -> RunData:
    """Read a run folder; ``ReportError`` (exit 2) names what is missing or unreadable."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ReportError(f"{d}: not a run folder (no such directory)")
    results_path = d / RESULTS
    if not results_path.is_file():
        raise ReportError(f"{d}: not a run folder (no {RESULTS})")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{results_path}: unreadable results ({exc})") from exc
    if not isinstance(results, dict) or "checks" not in results or "passed" not in results:
        raise ReportError(f"{results_path}: not a bk-sim results file (no 'passed'/'checks')")
    events: list[dict[str, Any]] = []
    bad = 0
    events_path = d / EVENTS
    if events_path.is_file():
        try:
            with events_path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        e = json.loads(line)
                    except json.JSONDecodeError:
                        bad += 1
                        continue
                    if isinstance(e, dict) and isinstance(e.get("t"), (int, float)):
                        events.append(e)
                    else:
                        bad += 1
        except OSError as exc:
            raise ReportError(f"{events_path}: unreadable event log ({exc})") from exc
    else:
        raise ReportError(f"{d}: not a run folder (no {EVENTS})")
    events.sort(key=lambda e: float(e["t"]))
    return RunData(d, results, events, bad)
