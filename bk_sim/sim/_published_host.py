"""``PublishedHost``: leaves running a published ``branchkey`` release, a ``LeafHost``.

Each slot is one leaf runner process (``bk_sim.published.PublishedLeafProcess``) inside
the release's cached env, hosting several leaves. The rounds are played by the same
``LeafAgent`` as our own client's leaves, in this (the harness's) process, through
``RunnerClient``: the harness generates and writes every upload with its own numpy
(``bk_sim.synth``, ``bk_sim.weights``), the runner only uploads the file, waits for the
notification and downloads the aggregate, and the harness reads it. So the events, the
uploads and the judge are the same for both clients, and the reference never meets the
env's numpy. The runner's own events come back through ``as_client_event`` in our
client's vocabulary, tagged with the leaf's index and its implementation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bk_sim import analytics
from bk_sim.analytics import PAYLOAD_KIND_FEDERATED_ANALYTICS
from bk_sim.engine import Event, LeafPlan, harness_event, leaf_implementations
from bk_sim.errors import PublishedClientError, ScenarioError
from bk_sim.published import (
    HttpRequest,
    LeafSettings,
    Notification,
    PublishedEnv,
    PublishedLeafProcess,
    Ready,
    Reply,
    RunnerEvent,
    RunnerExited,
    as_client_event,
    endpoint_of,
    parse_requirement,
    prepare,
    unobservable,
)
from bk_sim.scenario import OWN_IMPLEMENTATION, Scenario
from bk_sim.sim._agent import AggregateCache, LeafAgent
from bk_sim.sim._fa_agent import AnalyticsLeafAgent
from bk_sim.synth import tabular_spec

_log = logging.getLogger(__name__)

_GRACE_S = 15.0
_POLL_S = 0.5
_NO_NOTIFICATION = "no aggregation notification within"


def published_requirements(scenario: Scenario) -> list[str]:
    """The published requirements the scenario's leaves run, in first-use order."""
    seen: list[str] = []
    for name in leaf_implementations(scenario):
        if name != OWN_IMPLEMENTATION and name not in seen:
            seen.append(name)
    return seen


def prepare_implementations(
    scenario: Scenario, say: Callable[[str], None], *, cache_dir: Path | None = None
) -> dict[str, PublishedEnv]:
    """Each published requirement's env, checked and built (or reused) before anything of
    the run starts: a malformed, unknown or uninstallable requirement, or a transport
    the release does not have, is a one-line error (exit 2)."""
    requirements = published_requirements(scenario)
    for req in requirements:
        parse_requirement(req)  # every refusal before any pip run
    envs: dict[str, PublishedEnv] = {}
    for req in requirements:
        say(f"published client {req}: preparing its env (built once, then cached)")
        env = prepare(req, progress=say, cache_dir=cache_dir)
        if scenario.broker.provider != "none":
            try:
                env.check_transport(scenario.transport)
            except ScenarioError as exc:
                raise ScenarioError(f"{scenario.source or scenario.name}: {exc}") from None
        envs[req] = env
    return envs


def leaf_settings(
    scenario: Scenario,
    api_url: str,
    transport: str,
    amqp_host: str | None,
    amqp_port: int | None,
) -> LeafSettings:
    """The scenario's client settings in the published package's own config objects."""
    c = scenario.client
    amqp = transport == "amqp"
    return LeafSettings(
        host=api_url,
        transport=transport,
        verify_ssl=api_url.startswith("https://"),
        rabbitmq_host=(amqp_host or "127.0.0.1") if amqp else None,
        rabbitmq_port=(amqp_port or 5672) if amqp else None,
        rabbitmq_ssl=False if amqp else None,
        reconnect_max_attempts=c.reconnect.max_attempts,
        reconnect_backoff_factor=c.reconnect.backoff_factor,
        reconnect_max_delay=max(1, math.ceil(c.reconnect.max_delay)),
        retry={
            "max_retries": c.retry.max_retries,
            "backoff_factor": c.retry.backoff_factor,
            "total_timeout": max(1, math.ceil(c.retry.total_timeout)),
        },
    )


class _RunnerQueue:
    """``client.queue`` of a published leaf: ``get`` is the runner's ``wait_notification``."""

    def __init__(self, client: RunnerClient) -> None:
        self._client = client

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        wait = _POLL_S if timeout is None else max(0.01, timeout)
        reply = self._client.runner.wait_notification(self._client.key, timeout_s=wait)
        if reply.ok:
            return str((reply.result or {})["aggregation_id"])
        if reply.error and reply.error.startswith(_NO_NOTIFICATION):
            raise queue.Empty
        raise _failed("waiting for a notification", reply)


class RunnerClient:
    """One published leaf as ``LeafAgent`` drives a client (``LeafClient``): every call
    is a runner command for this leaf; a failed one is a ``PublishedClientError`` with the
    package's own error."""

    def __init__(self, runner: PublishedLeafProcess, key: str, upload_timeout_s: float) -> None:
        self.runner = runner
        self.key = key
        self._timeout = upload_timeout_s
        self._queue = _RunnerQueue(self)
        self._latest: str | None = None
        self._lock = threading.Lock()

    @property
    def queue(self) -> _RunnerQueue:
        return self._queue

    def notified(self, aggregation_id: str) -> None:
        """The package's consumer handed ``aggregation_id`` to its queue (an event)."""
        with self._lock:
            self._latest = aggregation_id

    def get_latest_aggregation_id(self) -> str | None:
        with self._lock:
            return self._latest

    def file_upload(self, file_path: str | os.PathLike[str]) -> str:
        reply = self.runner.upload(self.key, Path(file_path), timeout_s=self._timeout)
        if not reply.ok:
            raise _failed("upload", reply)
        return str((reply.result or {})["file_id"])

    def file_download(self, file_id: str) -> str:
        reply = self.runner.download(self.key, file_id, timeout_s=self._timeout)
        if not reply.ok:
            raise _failed("download", reply)
        return str((reply.result or {})["path"])

    def save_fields(
        self,
        entries: Mapping[str, Any],
        kind: str = PAYLOAD_KIND_FEDERATED_ANALYTICS,
        file_path: str | os.PathLike[str] = "fields",
        weighting: float | None = None,
    ) -> str:
        """An analytics archive, written by the harness (``bk_sim.analytics``) like every
        weights upload: the published package only uploads the file."""
        return str(analytics.save_fields(file_path, entries, kind, weighting))


def _failed(doing: str, reply: Reply) -> PublishedClientError:
    kind = f"{reply.error_type}: " if reply.error_type else ""
    return PublishedClientError(f"published client {doing} failed: {kind}{reply.error}")


@dataclass
class _Incarnation:
    """One runner process of a slot, and the leaf threads it serves."""

    runner: PublishedLeafProcess
    plans: dict[str, LeafPlan]
    clients: dict[str, RunnerClient] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    #: killed by chaos (or died as planned): what its leaves still report is dropped
    killed: threading.Event = field(default_factory=threading.Event)
    dead: set[int] = field(default_factory=set)


@dataclass
class PublishedSlot:
    """A slot of the host: leaves of one implementation in one runner process."""

    worker: int
    implementation: str
    plans: tuple[LeafPlan, ...]
    dies: bool = False
    incarnation: int = 0


def published_slots(
    plans: list[LeafPlan], processes: int | None, first_worker: int = 0
) -> list[PublishedSlot]:
    """Published leaves spread over runner processes per implementation, like the local
    host spreads ours; leaves that die get a runner per round they die in."""
    slots: list[PublishedSlot] = []
    by_impl: dict[str, list[LeafPlan]] = {}
    for p in plans:
        by_impl.setdefault(p.implementation, []).append(p)
    for impl, mine in by_impl.items():
        living = [p for p in mine if p.die_round is None]
        dying: dict[int, list[LeafPlan]] = {}
        for p in mine:
            if p.die_round is not None:
                dying.setdefault(p.die_round, []).append(p)
        n = min(processes or max(1, (os.cpu_count() or 1)), len(living))
        groups = [(tuple(living[w::n]), False) for w in range(n)]
        groups += [(tuple(dying[r]), True) for r in sorted(dying)]
        for group, dies in groups:
            slots.append(PublishedSlot(first_worker + len(slots), impl, group, dies))
    return slots


class PublishedHost:
    """Leaves of published implementations, one runner process per slot."""

    def __init__(
        self,
        scenario: Scenario,
        slots: list[PublishedSlot],
        envs: Mapping[str, PublishedEnv],
        settings: LeafSettings,
        run_dir: Path,
        aggregates_dir: Path,
    ) -> None:
        self.scenario = scenario
        self.slots = slots
        self._envs = dict(envs)
        self._settings = settings
        self._dir = run_dir / "published"
        self._cache = AggregateCache(aggregates_dir)
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop = threading.Event()
        self._live: dict[int, _Incarnation] = {}
        self._all: list[_Incarnation] = []
        self._lock = threading.Lock()
        #: each runner's ready line, by implementation (versions, what it cannot observe)
        self.ready: dict[str, Ready] = {}

    # ---------------------------------------------------------------- LeafHost

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def next_event(self, timeout: float) -> Event | None:
        try:
            if timeout <= 0:
                return self._events.get_nowait()
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def emit(self, event: Mapping[str, Any]) -> None:
        self._events.put(dict(event))

    def running(self) -> bool:
        with self._lock:
            return any(t.is_alive() for inc in self._all for t in inc.threads)

    def signal_stop(self) -> None:
        self._stop.set()

    def stop(self, sink: Callable[[Event], None]) -> None:
        """Let the leaves finish their current command and close their clients, then shut
        every runner down (SIGKILL after a bound); pass on what they still send."""
        self._stop.set()
        end = time.monotonic() + _GRACE_S
        while self.running() and time.monotonic() < end:
            e = self.next_event(0.2)
            if e is not None:
                sink(e)
        with self._lock:
            incarnations = list(self._all)
        for inc in incarnations:
            code = inc.runner.stop(timeout_s=_GRACE_S)
            if code not in (0, None) and not inc.killed.is_set():
                sink(
                    harness_event("worker_exit", process=f"runner-{inc.runner.pid}", exitcode=code)
                )
        while (e := self.next_event(0.0)) is not None:
            sink(e)

    def worker_of(self, leaf_index: int) -> int:
        for slot in self.slots:
            if any(p.index == leaf_index for p in slot.plans):
                return slot.worker
        raise KeyError(leaf_index)

    def leaves_of(self, worker: int) -> list[LeafPlan]:
        return list(self._slot(worker).plans)

    def kill(self, worker: int) -> int | None:
        inc = self._live.get(worker)
        if inc is None or not inc.runner.alive:
            return None
        inc.killed.set()
        pid = inc.runner.pid
        inc.runner.kill()
        return pid

    def restart(self, worker: int, first_round: int, known: frozenset[str]) -> None:
        slot = self._slot(worker)
        slot.plans = tuple(
            replace(p, first_round=first_round, known_aggregates=known, start_delay_s=0.0)
            for p in slot.plans
        )
        slot.incarnation += 1
        self._spawn(slot)

    # ---------------------------------------------------------------- describing

    def describe(self) -> dict[str, Any]:
        """results.json's ``implementations`` entries for the published leaves: versions,
        leaves, and what the harness cannot observe of each release."""
        out: dict[str, Any] = {}
        transport = self._settings.transport
        for req, env in self._envs.items():
            ready = self.ready.get(req)
            leaves = sorted(p.index for s in self.slots if s.implementation == req for p in s.plans)
            out[req] = {
                "kind": "published",
                "requirement": req,
                "implementation": env.implementation,
                "branchkey": env.branchkey_version,
                "numpy": ready.numpy if ready is not None else env.numpy_version,
                "python": ready.python if ready is not None else env.python_version,
                "transports": list(env.transports),
                "env": str(env.path),
                "leaves": leaves,
                "observed": list(ready.observed) if ready is not None else [],
                "unobservable": unobservable(
                    transport, runtime=ready.unobserved if ready is not None else ()
                ),
            }
        return out

    # ---------------------------------------------------------------- helpers

    def _slot(self, worker: int) -> PublishedSlot:
        for slot in self.slots:
            if slot.worker == worker:
                return slot
        raise KeyError(worker)

    def _spawn(self, slot: PublishedSlot) -> None:
        env = self._envs[slot.implementation]
        suffix = f"-r{slot.incarnation}" if slot.incarnation else ""
        workdir = self._dir / f"w{slot.worker}{suffix}"
        plans = {f"leaf-{p.index}": p for p in slot.plans}
        holder: list[_Incarnation] = []

        def on_event(event: RunnerEvent) -> None:
            if holder:
                self._runner_event(holder[0], slot, event)

        runner = PublishedLeafProcess(env, workdir, on_event=on_event, keep_events=False)
        inc = _Incarnation(runner=runner, plans=plans)
        holder.append(inc)
        with self._lock:  # known before it starts: stop() shuts it down even then (Ctrl-C)
            self._live[slot.worker] = inc
            self._all.append(inc)
        ready = runner.start()
        self.ready.setdefault(slot.implementation, ready)
        self.emit(
            harness_event(
                "published_runner",
                process=slot.worker,
                pid=ready.pid,
                implementation=slot.implementation,
                branchkey=ready.branchkey,
                numpy=ready.numpy,
                leaves=[p.index for p in slot.plans],
            )
        )
        upload_timeout = _upload_timeout_s(self.scenario)
        for key in plans:
            inc.clients[key] = RunnerClient(runner, key, upload_timeout)
        inc.threads = [
            threading.Thread(
                target=self._leaf_thread,
                args=(slot, inc, plan, key),
                name=f"published-{key}{suffix}",
                daemon=True,
            )
            for key, plan in plans.items()
        ]
        for t in inc.threads:
            t.start()

    def _put(self, inc: _Incarnation, event: Mapping[str, Any]) -> None:
        """A leaf's event, unless its runner was killed: a killed leaf says nothing more
        (chaos reports its death), as a SIGKILLed process of ours would not."""
        if not inc.killed.is_set():
            self._events.put(dict(event))

    def _runner_event(self, inc: _Incarnation, slot: PublishedSlot, event: RunnerEvent) -> None:
        plan = inc.plans.get(event.leaf) if event.leaf else None
        if plan is None:
            if isinstance(event, Ready | Reply):
                return
            data = event.to_dict()
            data.pop("event", None)
            data.pop("leaf", None)
            if isinstance(event, RunnerExited):
                data["killed"] = inc.killed.is_set() or None
            self._events.put(
                harness_event(
                    f"published_{event.kind}",
                    process=slot.worker,
                    implementation=slot.implementation,
                    **data,
                )
            )
            return
        if isinstance(event, Notification) and event.aggregation_id:
            client = inc.clients.get(str(event.leaf))
            if client is not None:
                client.notified(str(event.aggregation_id))
        mapped = as_client_event(
            event,
            leaf_id=plan.leaf_id,
            transport=self._settings.transport,
            leaf=plan.index,
            implementation=slot.implementation,
        )
        if mapped is not None:
            if isinstance(event, HttpRequest):  # per call: upload latency, retries included
                mapped["endpoint"] = endpoint_of(event.url)
            self._put(inc, mapped)

    def _leaf_thread(
        self, slot: PublishedSlot, inc: _Incarnation, plan: LeafPlan, key: str
    ) -> None:
        sc = self.scenario

        def event(kind: str, **fields: Any) -> None:
            self._put(inc, harness_event(kind, leaf=plan.index, leaf_id=plan.leaf_id, **fields))

        if plan.start_delay_s > 0 and self._stop.wait(plan.start_delay_s):
            return
        leaf_dir = inc.runner.workdir / key
        leaf_dir.mkdir(parents=True, exist_ok=True)
        event(
            "leaf_starting",
            weighting=plan.weighting,
            process=slot.worker,
            first_round=plan.first_round if plan.first_round > 1 else None,
            implementation=slot.implementation,
        )
        try:
            reply = inc.runner.start_leaf(
                key, plan.credentials, self._settings, timeout_s=sc.timeouts.leaf_start_s
            )
        except PublishedClientError as exc:
            event("leaf_error", round=0, error=f"client could not start: {exc}")
            return
        if not reply.ok:
            event("leaf_error", round=0, error=f"client could not start: {_failed('start', reply)}")
            return
        result = reply.result or {}
        event(
            "leaf_started",
            run_status=result.get("run_status"),
            run_number=result.get("run_number"),
            construct_s=result.get("construct_s"),
            implementation=slot.implementation,
        )
        common: dict[str, Any] = {
            "seed": sc.seed,
            "model": sc.model,
            "rounds": sc.rounds,
            "compression": sc.payload.compression,
            "notification_timeout_s": sc.timeouts.notification_s,
            "client": inc.clients[key],
            "work_dir": leaf_dir,
            "cache": self._cache,
            "emit": lambda ev: self._put(inc, ev.to_dict()),
            "stop": self._stop,
        }
        agent = (
            AnalyticsLeafAgent(plan, tabular=tabular_spec(sc), **common)
            if sc.payload.kind == "federated_analytics"
            else LeafAgent(plan, **common)
        )
        try:
            agent.run()
        except Exception as exc:  # noqa: BLE001 - report, never hang the run
            _log.exception("published leaf %d: unexpected error", plan.index)
            event("leaf_error", round=-1, error=f"unexpected: {type(exc).__name__}: {exc}")
        if agent.died:
            self._died(slot, inc, plan)
            return
        if not inc.killed.is_set():
            with contextlib.suppress(PublishedClientError):
                inc.runner.stop_leaf(key)
            event("leaf_closed")

    def _died(self, slot: PublishedSlot, inc: _Incarnation, plan: LeafPlan) -> None:
        """A leaf reached its ``die_round``: once every leaf of its runner has, the runner
        is SIGKILLed, so the platform and the broker see what a crashed leaf looks like."""
        with self._lock:
            inc.dead.add(plan.index)
            everyone = len(inc.dead) == len(inc.plans)
        if everyone and slot.dies:
            inc.killed.set()
            inc.runner.kill()


def _upload_timeout_s(scenario: Scenario) -> float:
    """A bound on one upload or download command: every attempt timing out, plus the
    retry waits (urllib3's backoff is capped at 120 s), plus a margin."""
    r = scenario.client.retry
    attempts = r.max_retries + 1
    return attempts * r.total_timeout + r.max_retries * min(120.0, r.backoff_factor * 8) + 30.0
