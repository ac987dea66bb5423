"""What a run shows while it plays: counts from the event stream, as lines or live.

``RunCounters`` counts the one event stream; ``Progress`` shows them: a live rich panel
on a terminal, plain status lines otherwise (CI, pipes), as every run printed before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Say = Callable[[str], None]


@dataclass
class RunCounters:
    """Counts of what the leaves did so far, from their events."""

    started: int = 0
    connected: int = 0
    uploads: int = 0
    notified: int = 0
    downloads: int = 0
    errors: int = 0
    retries: int = 0
    reconnects: int = 0
    faults: int = 0
    done: int = 0
    round: int = 0

    def line(self, total: int, rounds: int, elapsed: float) -> str:
        faults = f"  faults {self.faults}" if self.faults else ""
        return (
            f"[{elapsed:6.1f}s] round {self.round}/{rounds}  leaves {self.started}/{total} "
            f"connected {self.connected}  uploads {self.uploads}  notified {self.notified}  "
            f"downloads {self.downloads}  retries {self.retries}  reconnects {self.reconnects}  "
            f"errors {self.errors}  done {self.done}{faults}"
        )

    def count(self, e: Mapping[str, Any]) -> None:
        kind = e.get("kind")
        if kind == "leaf_started":
            self.started += 1
        elif kind == "connect":
            if int(e.get("attempt", 0) or 0) > 0:
                self.reconnects += 1
            self.connected += 1
        elif kind == "upload":
            self.uploads += 1
            self.round = max(self.round, int(e.get("round", 0)))
        elif kind == "aggregate_notified":
            self.notified += 1
        elif kind == "download":
            self.downloads += 1
        elif kind == "leaf_error":
            self.errors += 1
        elif kind == "retry_wait":
            self.retries += 1
        elif kind in ("leaf_done", "leaf_died"):
            self.done += 1
        elif kind == "fault_start":
            self.faults += 1
