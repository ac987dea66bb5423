"""When a scheduled fault fires: round phases read from the run's live event stream.

Phases of round ``r`` (times are when the orchestrator saw the event):

* ``round_start``: round 1 when the leaves spawn; round ``r`` > 1 when round ``r-1``'s
  uploads are all in (from then on, uploads belong to round ``r``);
* ``first_upload``: the first upload of round ``r`` completed;
* ``uploads_half_done``: half of the round's expected uploads completed;
* ``awaiting_aggregate``: all expected uploads completed, so the leaves wait for the
  aggregate (a platform notification delay widens this window);
* ``round_closed``: the first leaf was notified of round ``r``'s aggregate.

Expected uploads of a round are the leaves that plan to upload in it, less those a chaos
fault killed and did not restart by then.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any


class PhaseTracker:
    """Round phases from events; ``on_event`` from the orchestrator, ``reached`` from faults."""

    def __init__(self, plans: Sequence[Any], rounds: int) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rounds = rounds
        self._plans = {p.index: p for p in plans}
        self._uploads: dict[int, set[int]] = defaultdict(set)
        self._phase_at: dict[tuple[int, str], float] = {}
        self._down: set[int] = set()  # leaves killed and not (yet) back
        self.aggregates: list[str] = []  # aggregation ids notified so far, in order
        self.upload_ids: set[str] = set()
        self.last_download: dict[int, str] = {}  # leaf -> aggregation id it downloaded last
        self.current_round = 1
        self.started_at: float | None = None

    # -- feeding
    def start(self, t: float | None = None) -> None:
        with self._lock:
            self.started_at = time.time() if t is None else t
            self._mark(1, "round_start", self.started_at)

    def on_event(self, e: Mapping[str, Any]) -> None:
        kind = e.get("kind")
        if kind not in ("upload", "aggregate_notified", "notification", "download"):
            return
        with self._lock:
            t = float(e.get("t", time.time()))
            if kind == "download":
                self.last_download[int(e["leaf"])] = str(e["aggregation_id"])
            elif kind == "upload":
                self.upload_ids.add(str(e["file_id"]))
                r = int(e["round"])
                self._uploads[r].add(int(e["leaf"]))
                self.current_round = max(self.current_round, r)
                self._mark(r, "first_upload", t)
                self._check_counts(r, t)
            elif kind == "aggregate_notified":
                r = int(e["round"])
                self._mark(r, "round_closed", t)
            elif e.get("message_type") == "aggregation_status" and e.get("value"):
                if e["value"] not in self.aggregates:
                    self.aggregates.append(str(e["value"]))

    def set_down(self, leaves: Sequence[int], down: bool) -> None:
        """Killed leaves stop counting towards expected uploads (restarted ones count again)."""
        with self._lock:
            if down:
                self._down.update(leaves)
            else:
                self._down.difference_update(leaves)
            t = time.time()
            for r in range(1, self._rounds + 1):
                self._check_counts(r, t)

    # -- asking
    def reached(self, round_index: int, phase: str) -> float | None:
        """When ``phase`` of ``round_index`` was reached (a Unix time), or None."""
        with self._lock:
            return self._phase_at.get((round_index, phase))

    def wait(
        self, round_index: int, phase: str, stop: threading.Event, poll: float = 0.05
    ) -> float | None:
        """Block until the phase is reached (its time) or ``stop`` is set (None)."""
        while not stop.is_set():
            with self._changed:
                at = self._phase_at.get((round_index, phase))
                if at is not None:
                    return at
                self._changed.wait(poll)
        return None

    def expected_uploads(self, round_index: int) -> int:
        with self._lock:
            return self._expected(round_index)

    # -- internals (lock held)
    def _expected(self, r: int) -> int:
        return sum(
            1
            for p in self._plans.values()
            if p.index not in self._down
            and r not in p.skip_rounds
            and (p.die_round is None or p.die_round > r)
        )

    def _check_counts(self, r: int, t: float) -> None:
        n = len(self._uploads.get(r, ()))
        if n == 0:
            return
        expected = self._expected(r)
        if n >= math.ceil(expected / 2):
            self._mark(r, "uploads_half_done", t)
        if n >= expected:
            self._mark(r, "awaiting_aggregate", t)
            if r + 1 <= self._rounds:
                self._mark(r + 1, "round_start", t)

    def _mark(self, r: int, phase: str, t: float) -> None:
        if (r, phase) not in self._phase_at:
            self._phase_at[(r, phase)] = t
            self._changed.notify_all()
