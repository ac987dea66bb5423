"""``LocalProcessHost``: the run's leaves as local processes, a ``LeafHost`` of the engine.

Leaves are spread over worker processes (threads inside each); their events come back on
one queue. A slot can be killed (SIGKILL) and started again from a later round (chaos).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import multiprocess as mp

from bk_sim.engine import Event, LeafPlan, harness_event
from bk_sim.sim._aio_worker import aio_worker_main
from bk_sim.sim._worker import WorkerSpec, worker_main

_log = logging.getLogger(__name__)

_WORKER_GRACE_S = 15.0


class LocalProcessHost:
    """Leaf processes on this machine: one slot per ``WorkerSpec``."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.ctx: Any = mp.get_context("spawn")
        self.specs = specs
        self.events: Any = self.ctx.Queue()
        self._stop: Any = self.ctx.Event()
        self.procs: list[Any] = []  # grows when a slot is restarted
        self._live: dict[int, Any] = {}

    # ---------------------------------------------------------------- LeafHost

    def start(self) -> None:
        for spec in self.specs:
            self._spawn(spec)

    def next_event(self, timeout: float) -> Event | None:
        try:
            if timeout <= 0:
                e: Event = self.events.get_nowait()
            else:
                e = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        return e

    def emit(self, event: Mapping[str, Any]) -> None:
        self.events.put(dict(event))

    def running(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def signal_stop(self) -> None:
        self._stop.set()

    def stop(self, sink: Callable[[Event], None]) -> None:
        """Tell the leaves to stop, wait a grace period passing on their events, then
        terminate what is left; what is still queued is passed on too."""
        self._stop.set()
        end = time.monotonic() + _WORKER_GRACE_S
        while self.running() and time.monotonic() < end:
            e = self.next_event(0.2)
            if e is not None:
                sink(e)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
            if p.exitcode not in (0, None):
                sink(harness_event("worker_exit", process=p.name, exitcode=p.exitcode))
        # Not get_nowait: what this process put itself (chaos hooks) may still sit in the
        # queue's feeder thread, and an inferred upload lost here fails validation.
        with contextlib.suppress(OSError, ValueError):
            while (e := self.next_event(0.2)) is not None:
                sink(e)

    def worker_of(self, leaf_index: int) -> int:
        for spec in self.specs:
            if any(p.index == leaf_index for p in spec.plans):
                return spec.worker
        raise KeyError(leaf_index)

    def leaves_of(self, worker: int) -> list[LeafPlan]:
        return list(self.specs[worker].plans)

    def kill(self, worker: int) -> int | None:
        proc = self._live.get(worker)
        if proc is None or not proc.is_alive():
            return None
        proc.kill()
        proc.join(timeout=5)
        self._unstick_events()
        return int(proc.pid)

    def restart(self, worker: int, first_round: int, known: frozenset[str]) -> None:
        old = self.specs[worker]
        plans = tuple(
            replace(p, first_round=first_round, known_aggregates=known, start_delay_s=0.0)
            for p in old.plans
        )
        spec = replace(old, plans=plans, incarnation=old.incarnation + 1)
        self.specs[worker] = spec
        self._spawn(spec)

    # ---------------------------------------------------------------- helpers

    def _spawn(self, spec: WorkerSpec) -> Any:
        suffix = f"-r{spec.incarnation}" if spec.incarnation else ""
        proc = self.ctx.Process(
            target=aio_worker_main if spec.scenario.leaves.host == "event_loop" else worker_main,
            args=(spec, self.events, self._stop),
            name=f"bk-sim-w{spec.worker}{suffix}",
        )
        proc.start()
        self.procs.append(proc)
        self._live[spec.worker] = proc
        return proc

    def _unstick_events(self) -> None:
        """A process killed while its queue feeder held the queue's shared write lock
        leaves it locked forever, and every other writer would hang: free it then.
        (Small event messages are written to the pipe in one atomic write, so the stream
        itself is intact.)"""
        lock = getattr(self.events, "_wlock", None)  # multiprocess(ing) Queue internals
        if lock is None:
            return
        if lock.acquire(timeout=2.0):
            lock.release()
            return
        _log.warning("a killed leaf process held the event queue's lock: releasing it")
        try:
            lock.release()
        except ValueError:  # released meanwhile after all
            pass
