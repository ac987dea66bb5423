"""A leaf-hosting process with one event loop: many leaves, a fixed number of threads.

``leaves.host: event_loop``. The thread host (``_worker``) gives every leaf a thread for
its agent and another for its AMQP consumer: 1,000 leaves are ~2,000 threads, and the
round's time goes to switching between them. Here each process runs:

* one asyncio loop on which every leaf is a coroutine (its start delay, its rounds, its
  waits for a notification: no thread while it waits);
* one pika ``IOLoop`` thread on which every leaf's own AMQP connection and queue live
  (``bk_sim.client.SharedAmqpLoop``: the client core's consumer, unchanged, sharing a
  loop);
* a small pool of threads for the blocking parts: the client core's HTTP calls (its
  retries with their documented waits and Retry-After, unchanged) and generating and
  compressing an upload.

Each leaf is the same ``LeafAgent`` doing the same steps with the same events (its
``upload``/``download`` steps run in the pool), so the engine's judge applies unchanged.
WebSocket notifications still use the client's thread per consumer (not done here).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bk_sim.client import ClientEvent, SharedAmqpLoop
from bk_sim.engine import LeafPlan, client_event, harness_event
from bk_sim.errors import BkSimError
from bk_sim.sim._agent import AggregateCache, LeafAgent
from bk_sim.sim._fa_agent import AnalyticsLeafAgent
from bk_sim.sim._worker import WorkerSpec, die, make_client
from bk_sim.synth import tabular_spec

_log = logging.getLogger(__name__)

T = TypeVar("T")

_STOP_POLL_S = 0.2
#: Threads for the blocking steps of all the process's leaves.
POOL_THREADS = 16


class _Observer:
    """Client events to the stream; a notification also wakes its leaf's coroutine."""

    def __init__(
        self, put: Callable[[dict[str, Any]], None], leaf: int, wake: Callable[[], None]
    ) -> None:
        self._put = put
        self._leaf = leaf
        self._wake = wake

    def on_event(self, event: ClientEvent) -> None:
        self._put(client_event(event, leaf=self._leaf))
        if event.kind == "notification":
            self._wake()


class _Process:
    """The process's leaves, loop, pool and shared AMQP loop."""

    def __init__(self, spec: WorkerSpec, put: Callable[[dict[str, Any]], None], work: Path):
        self.spec = spec
        self.put = put
        self.work = work
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(
            max_workers=min(POOL_THREADS, max(1, len(spec.plans))),
            thread_name_prefix=f"bk-leaf-pool-w{spec.worker}",
        )
        self.amqp = SharedAmqpLoop(name=f"bk-amqp-w{spec.worker}")
        self.cache = AggregateCache(spec.aggregates_dir)
        self.stopping = asyncio.Event()
        self.stop_flag = threading.Event()  # for LeafAgent's own checks, in the pool
        self.dead: set[int] = set()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.loop.run_in_executor(self.pool, fn, *args)

    def stop(self) -> None:
        self.stop_flag.set()
        self.stopping.set()

    async def sleep_or_stop(self, seconds: float) -> bool:
        """Wait ``seconds``; True when the run stopped meanwhile."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def leaf(self, plan: LeafPlan) -> None:
        def event(kind: str, **fields: Any) -> None:
            self.put(harness_event(kind, leaf=plan.index, leaf_id=plan.leaf_id, **fields))

        if plan.start_delay_s > 0 and await self.sleep_or_stop(plan.start_delay_s):
            return
        leaf_dir = self.work / f"leaf-{plan.index}"
        leaf_dir.mkdir(parents=True, exist_ok=True)
        event(
            "leaf_starting",
            weighting=plan.weighting,
            process=self.spec.worker,
            first_round=plan.first_round if plan.first_round > 1 else None,
        )
        woken = asyncio.Event()

        def wake() -> None:
            self.loop.call_soon_threadsafe(woken.set)

        observer = _Observer(self.put, plan.index, wake)
        try:
            # WebSocket: the client's own consumer (a thread each; not on the loop yet)
            factory = self.amqp.factory if self.spec.transport == "amqp" else None
            client = await self.blocking(make_client, self.spec, plan, observer, leaf_dir, factory)
        except BkSimError as exc:
            event("leaf_error", round=0, error=f"client could not start: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a harness bug must be reported, not hang
            _log.exception("leaf %d: unexpected error starting its client", plan.index)
            event("leaf_error", round=0, error=f"unexpected: {type(exc).__name__}: {exc}")
            return
        event("leaf_started", run_status=client.run_status, run_number=client.run_number)
        sc = self.spec.scenario
        common: dict[str, Any] = {
            "seed": sc.seed,
            "model": sc.model,
            "rounds": sc.rounds,
            "compression": sc.payload.compression,
            "notification_timeout_s": sc.timeouts.notification_s,
            "client": client,
            "work_dir": leaf_dir,
            "cache": self.cache,
            "emit": lambda ev: self.put(ev.to_dict()),
            "stop": self.stop_flag,
        }
        # the same agent as the thread host's: its upload / download steps are its own
        agent = (
            AnalyticsLeafAgent(plan, tabular=tabular_spec(sc), **common)
            if sc.payload.kind == "federated_analytics"
            else LeafAgent(plan, **common)
        )
        try:
            await self._play(agent, woken)
        except Exception as exc:  # noqa: BLE001 - report, never hang the run
            _log.exception("leaf %d: unexpected error", plan.index)
            event("leaf_error", round=-1, error=f"unexpected: {type(exc).__name__}: {exc}")
        finally:
            if agent.died:
                self.dead.add(plan.index)
                await self.stopping.wait()  # the process is killed before the run ends
            await self.blocking(client.close)
            event("leaf_closed")

    async def _play(self, agent: LeafAgent, woken: asyncio.Event) -> None:
        """``LeafAgent.run`` with its waits on this loop (same steps, same events)."""
        plan = agent.plan
        rounds = self.spec.scenario.rounds
        for round_index in range(plan.first_round, rounds + 1):
            if self.stopping.is_set():
                agent.emit_event("leaf_stopped", round=round_index, reason="run stopped")
                return
            try:
                if not await self._round(agent, round_index, woken):
                    return
            except BkSimError as exc:
                agent.emit_event("leaf_error", round=round_index, error=str(exc))
                return
        agent.emit_event("leaf_done", rounds=rounds)

    async def _round(self, agent: LeafAgent, round_index: int, woken: asyncio.Event) -> bool:
        plan = agent.plan
        if plan.die_round == round_index:
            agent.emit_event("leaf_died", round=round_index, reason="dropout: its process dies")
            agent.died = True
            return False
        uploaded_at: float | None = None
        if round_index in plan.skip_rounds:
            agent.emit_event("round_skipped", round=round_index, reason="dropout: skips this round")
        else:
            if plan.straggle_s > 0 and await self.sleep_or_stop(plan.straggle_s):
                return False
            uploaded_at = await self.blocking(agent.upload, round_index)
        aggregation_id = await self._await_aggregate(agent, round_index, uploaded_at, woken)
        if aggregation_id is None:
            return False
        await self.blocking(agent.download, round_index, aggregation_id)
        return True

    async def _await_aggregate(
        self, agent: LeafAgent, round_index: int, uploaded_at: float | None, woken: asyncio.Event
    ) -> str | None:
        timeout = self.spec.scenario.timeouts.notification_s
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            woken.clear()  # before reading: no wake-up is lost
            try:
                aggregation_id = agent.client.queue.get(block=False)
            except queue.Empty:
                aggregation_id = None
            if aggregation_id is not None:
                fresh = agent.take_notified(round_index, str(aggregation_id), uploaded_at)
                if fresh:
                    return str(aggregation_id)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                agent.emit_event(
                    "leaf_error",
                    round=round_index,
                    error=f"no aggregation notification within {timeout:g} s",
                )
                return None
            waiter = asyncio.ensure_future(woken.wait())
            stopper = asyncio.ensure_future(self.stopping.wait())
            _, pending = await asyncio.wait(
                {waiter, stopper}, timeout=min(remaining, 1.0), return_when="FIRST_COMPLETED"
            )
            for p in pending:
                p.cancel()
        agent.emit_event("leaf_stopped", round=round_index, reason="run stopped")
        return None


async def _main(spec: WorkerSpec, events: Any, stop: Any) -> None:
    put: Callable[[dict[str, Any]], None] = events.put
    with tempfile.TemporaryDirectory(
        prefix=f"bk-sim-w{spec.worker}-", ignore_cleanup_errors=True
    ) as tmp:
        proc = _Process(spec, put, Path(tmp))
        tasks = [asyncio.ensure_future(proc.leaf(plan)) for plan in spec.plans]
        try:
            while not all(t.done() for t in tasks):
                if stop.is_set():
                    proc.stop()
                if (
                    spec.dies
                    and not proc.stopping.is_set()
                    and proc.dead
                    and len(proc.dead) == sum(not t.done() for t in tasks)
                ):
                    die(events)
                await asyncio.wait(tasks, timeout=_STOP_POLL_S)
        finally:
            proc.stop()
            if tasks:
                await asyncio.wait(tasks, timeout=10)
            proc.amqp.close()
            proc.pool.shutdown(wait=False, cancel_futures=True)
    put(harness_event("worker_done", process=spec.worker))


def aio_worker_main(spec: WorkerSpec, events: Any, stop: Any) -> None:
    """Process entry point: this worker's leaves as coroutines on one event loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides (see _worker)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    _log.debug("event-loop worker %d: %d leaves, pid %d", spec.worker, len(spec.plans), os.getpid())
    asyncio.run(_main(spec, events, stop))
