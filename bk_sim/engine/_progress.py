"""What a run shows while it plays: counts from the event stream, as lines or live.

``RunCounters`` counts the one event stream; ``Progress`` shows them: a live rich panel
on a terminal, plain status lines otherwise (CI, pipes), as every run printed before.
"""

from __future__ import annotations

import math
import os
import sys
import time
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

    def fields(self, total: int, rounds: int) -> dict[str, str]:
        """The counts as the live display shows them."""
        return {
            "round": f"{self.round}/{rounds}",
            "leaves": f"{self.started}/{total}",
            "connected": str(self.connected),
            "uploads": str(self.uploads),
            "notifications": str(self.notified),
            "downloads": str(self.downloads),
            "retries": str(self.retries),
            "reconnects": str(self.reconnects),
            "faults": str(self.faults),
            "errors": str(self.errors),
            "done": str(self.done),
        }


class StatusBoard:
    """Shows a run's status while it plays: one rich live table on a terminal, else a
    plain line every ``every_s`` seconds (what CI logs and pipes get, as before).

    While live, ``say`` prints above the table, so status lines are never torn.
    """

    def __init__(
        self,
        say: Say,
        title: str,
        *,
        live: bool | None = None,
        every_s: float = 2.0,
        console: Any = None,
    ) -> None:
        self._say = say
        self._title = title
        self._every_s = every_s
        self._last = -math.inf
        self._console = console
        if live is None:
            live = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self.live = live
        self._live: Any = None

    def __enter__(self) -> StatusBoard:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            console = self._console or Console(stderr=True)
            self._live = Live(console=console, refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def say(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
        else:
            self._say(line)

    def show(self, line: str, fields: Mapping[str, str], *, force: bool = False) -> None:
        """The current status: the table when live, else ``line`` when it is time."""
        now = time.monotonic()
        if self._live is not None:
            self._live.update(self._table(fields))
            return
        if force or now - self._last >= self._every_s:
            self._last = now
            self._say(line)

    def _table(self, fields: Mapping[str, str]) -> Any:
        """Name/value pairs that wrap to the terminal's width (never truncated)."""
        from rich.columns import Columns
        from rich.panel import Panel
        from rich.text import Text

        cells = [Text.assemble((f"{name} ", "bold"), value) for name, value in fields.items()]
        return Panel(Columns(cells, padding=(0, 3)), title=self._title, title_align="left")
