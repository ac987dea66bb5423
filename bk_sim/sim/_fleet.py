"""``FleetHost``: one ``LeafHost`` made of several (a mixed fleet: our client's leaf
processes beside published clients' runners).

Slots are numbered across the hosts in order (the first host's 0..k-1, then the next
host's), so chaos can kill and restart any leaf's slot without knowing who hosts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bk_sim.engine import Event, LeafHost, LeafPlan

_SLICE_S = 0.02


class FleetHost:
    """Several hosts as one: events of all, in order per leaf (each host keeps its own)."""

    def __init__(self, hosts: Sequence[tuple[LeafHost, int]]) -> None:
        """``hosts``: each host with the number of slots it has."""
        self._hosts = [h for h, _ in hosts]
        self._offsets: list[int] = []
        total = 0
        for _, slots in hosts:
            self._offsets.append(total)
            total += slots
        self._next = 0

    def start(self) -> None:
        for h in self._hosts:
            h.start()

    def next_event(self, timeout: float) -> Event | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            for i in range(len(self._hosts)):  # round robin: no host starves another
                h = self._hosts[(self._next + i) % len(self._hosts)]
                e = h.next_event(0.0)
                if e is not None:
                    self._next = (self._next + i + 1) % len(self._hosts)
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(_SLICE_S, left))

    def emit(self, event: Mapping[str, Any]) -> None:
        self._hosts[0].emit(event)

    def running(self) -> bool:
        return any(h.running() for h in self._hosts)

    def signal_stop(self) -> None:
        for h in self._hosts:
            h.signal_stop()

    def stop(self, sink: Callable[[Event], None]) -> None:
        self.signal_stop()
        for h in self._hosts:
            h.stop(sink)

    def worker_of(self, leaf_index: int) -> int:
        for h, offset in zip(self._hosts, self._offsets, strict=True):
            try:
                return offset + h.worker_of(leaf_index)
            except KeyError:
                continue
        raise KeyError(leaf_index)

    def _locate(self, worker: int) -> tuple[LeafHost, int]:
        for h, offset in reversed(list(zip(self._hosts, self._offsets, strict=True))):
            if worker >= offset:
                return h, worker - offset
        raise KeyError(worker)

    def leaves_of(self, worker: int) -> list[LeafPlan]:
        h, local = self._locate(worker)
        return h.leaves_of(local)

    def kill(self, worker: int) -> int | None:
        h, local = self._locate(worker)
        return h.kill(local)

    def restart(self, worker: int, first_round: int, known: frozenset[str]) -> None:
        h, local = self._locate(worker)
        h.restart(local, first_round, known)
