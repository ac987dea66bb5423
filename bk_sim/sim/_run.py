"""``SimulationRun``: ``bk-sim run`` (and, with chaos hooks, ``bk-sim chaos``) on the engine.

The workload part only: plan the leaves, host them as local processes, fetch what the
platform aggregated, and judge the aggregates against the reference. The broker, the
platform, the event log, the verdict and results.json are the engine's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bk_sim.broker import check_socket_capacity
from bk_sim.client import Client
from bk_sim.engine import (
    Check,
    EventLog,
    HookContext,
    LeafHost,
    LeafPlan,
    MemorySampler,
    PlatformAccess,
    PlatformNeeds,
    RoundRecord,
    RunCounters,
    RunEnvironment,
    RunHooks,
    RunResult,
    Say,
    harness_event,
    judge,
    memory_check,
    plan_leaves,
    preflight,
    read_events,
)
from bk_sim.errors import BkSimError
from bk_sim.npzstream import return_freed_chunks
from bk_sim.scenario import OWN_IMPLEMENTATION, Scenario
from bk_sim.sim._fleet import FleetHost
from bk_sim.sim._host import LocalProcessHost
from bk_sim.sim._published_host import (
    PublishedHost,
    leaf_settings,
    prepare_implementations,
    published_slots,
)
from bk_sim.sim._worker import WorkerSpec
from bk_sim.synth import field_ops, leaf_weightings, tabular_spec

_log = logging.getLogger(__name__)

_SOCKET_MARGIN = 50


class SimulationRun:
    """One run of a scenario; build it, call ``execute()``."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        progress: Say | None = None,
        run_dir: Path | None = None,
        may_enable_plugin: bool = False,
        hooks: RunHooks | None = None,
    ) -> None:
        # Weightings that overflow are a ScenarioError: raise it before a platform, a broker
        # or a chaos proxy is started, not halfway through the run.
        leaf_weightings(scenario.seed, scenario.leaves.weighting, scenario.leaves.count)
        # A model that cannot fit (platform limits, memory, disk) is refused now, with the
        # numbers, not ten minutes into the run (issue 17).
        preflight(scenario, Path(tempfile.gettempdir()))
        return_freed_chunks()  # the validator streams chunks (issue 17)
        self.scenario = scenario
        self._hooks = hooks
        self.env = RunEnvironment(
            scenario, run_dir=run_dir, progress=progress, may_enable_plugin=may_enable_plugin
        )
        self._say = self.env.say
        if hooks is None and scenario.chaos.faults:
            self._say(
                f"the scenario schedules {len(scenario.chaos.faults)} chaos faults; "
                "bk-sim run ignores them (bk-sim chaos plays them)"
            )

    @property
    def run_dir(self) -> Path:
        return self.env.run_dir

    def execute(self) -> RunResult:
        sc, env, hooks = self.scenario, self.env, self._hooks
        analytics = sc.payload.kind == "federated_analytics"
        # Published clients' envs are checked and built before anything else starts.
        published_envs = prepare_implementations(sc, self._say)
        env.make_run_dir("aggregates")
        aggregates = self.run_dir / "aggregates"
        log = EventLog(self.run_dir / "events.jsonl")
        interrupted = False
        implementations: dict[str, Any] = {}
        records: list[RoundRecord] | None = None
        access: PlatformAccess | None = None
        local_hosts: list[LocalProcessHost] = []
        memory = MemorySampler(lambda: _labels(local_hosts))
        try:
            with contextlib.ExitStack() as stack:
                endpoints = env.broker(stack, chaos=hooks is not None)
                transport = env.transport(endpoints)
                log.write(
                    harness_event(
                        "run_started",
                        scenario=sc.name,
                        broker=endpoints.provider,
                        broker_reason=endpoints.reason,
                        transport=transport,
                    )
                )
                needs = PlatformNeeds(
                    leaves=sc.leaves.count,
                    tree_name=f"bk-sim-{sc.name}",
                    quorum=sc.platform.quorum,
                    round_timeout_s=sc.platform.round_timeout_s,
                    purpose=f"the scenario needs leaves.count = {sc.leaves.count}",
                    field_ops=field_ops(tabular_spec(sc)) if analytics else None,
                )
                access = stack.enter_context(env.platform_for(endpoints, needs, log))
                memory.start()  # the platform is at rest now: its first sample is its base
                if transport == "amqp":
                    check_socket_capacity(endpoints, sc.leaves.count + _SOCKET_MARGIN)
                amqp_host, amqp_port = env.leaf_amqp(endpoints)  # AMQPS in a TLS run
                if hooks is not None:
                    amqp_host, amqp_port = hooks.prepare(endpoints, amqp_host, amqp_port)
                plans = plan_leaves(sc, access.credentials)
                own = [p for p in plans if p.implementation == OWN_IMPLEMENTATION]
                theirs = [p for p in plans if p.implementation != OWN_IMPLEMENTATION]
                hosts: list[tuple[LeafHost, int]] = []
                if own:
                    local = LocalProcessHost(
                        self._specs(own, access.api_url, transport, amqp_host, amqp_port)
                    )
                    hosts.append((local, len(local.specs)))
                    local_hosts.append(local)
                published: PublishedHost | None = None
                if theirs:
                    settings = leaf_settings(sc, access.api_url, transport, amqp_host, amqp_port)
                    slots = published_slots(theirs, sc.leaves.processes)
                    published = PublishedHost(
                        sc, slots, published_envs, settings, self.run_dir, aggregates
                    )
                    hosts.append((published, len(slots)))
                host: LeafHost = hosts[0][0] if len(hosts) == 1 else FleetHost(hosts)
                implementations = (
                    {OWN_IMPLEMENTATION: {"kind": "own", "leaves": [p.index for p in own]}}
                    if own
                    else {}
                )
                log.write(
                    harness_event(
                        "leaves_spawning",
                        processes=sum(n for _, n in hosts),
                        leaves=len(plans),
                        implementations={
                            name: sum(1 for p in plans if p.implementation == name)
                            for name in dict.fromkeys(p.implementation for p in plans)
                        },
                    )
                )

                def begin() -> None:
                    if hooks is not None:
                        hooks.begin(
                            HookContext(
                                scenario=sc,
                                run_dir=self.run_dir,
                                endpoints=endpoints,
                                admin=access.admin if sc.platform.mode == "local" else None,
                                branch_id=access.branch_id if sc.platform.mode == "local" else None,
                                base_faults=access.base_faults,
                                credentials=access.credentials,
                                plans=plans,
                                emit=host.emit,
                                workers=host,
                                platform=access.handle,
                            )
                        )

                try:
                    interrupted = env.play(host, log, RunCounters(), hooks=hooks, on_started=begin)
                finally:
                    if hooks is not None:
                        hooks.end()
                    if published is not None:
                        implementations.update(published.describe())
                try:
                    records = access.rounds()
                except BkSimError as exc:
                    self._say(f"could not read the platform's round records: {exc}")
                    log.write(harness_event("records_unavailable", error=str(exc)))
                if records:
                    _fetch_missing(
                        records, _fetcher(access.api_url, access.credentials, aggregates)
                    )
        except KeyboardInterrupt:
            interrupted = True
        finally:
            log.close()
        log_path = self.run_dir / "events.jsonl"
        events = list(read_events(log_path)) if log_path.exists() else []
        self._say(
            "validating the analytics rounds against the pooled columns"
            if analytics
            else "validating aggregates against the reference"
        )
        # A local platform is stopped by now: only a remote one can still be asked.
        fetch = None
        if access is not None and access.credentials and sc.platform.mode == "remote":
            fetch = _fetcher(access.api_url, access.credentials, aggregates)
        try:
            judgement = judge(sc, events, records, aggregates, fetch=fetch, run_started=env.started)
        finally:
            memory.stop()
        checks: list[Check] = list(judgement.checks)
        at_rest = {
            int(e["pid"]): int(e["rss"])
            for e in reversed(events)  # the first leaf_started of a process wins
            if e.get("kind") == "leaf_started" and "pid" in e and "rss" in e
        }
        memory_section = memory.section(sc.model.nbytes, at_rest)
        verdict_of_memory = memory_check(memory_section)
        if verdict_of_memory is not None:
            ok, detail = verdict_of_memory
            checks.append(Check("memory: every process within 3 x S of one model", ok, detail))
        sections: dict[str, Any] = {
            "rounds": [r.to_dict() for r in judgement.rounds],
            "notifications": judgement.notifications,
            "downloads": judgement.downloads,
            "leaves": judgement.leaves,
            "timings": judgement.timings,
            "memory": memory_section,
        }
        if analytics:
            sections["analytics"] = judgement.analytics
        if implementations:
            sections["implementations"] = implementations
        if hooks is not None:
            hook_checks, hook_section = hooks.judge(events, records, judgement)
            checks.extend(hook_checks)
            sections[hooks.section] = hook_section
        return env.finish(checks, sections, interrupted=interrupted)

    def _specs(
        self,
        plans: list[LeafPlan],
        api_url: str,
        transport: str,
        amqp_host: str | None,
        amqp_port: int | None,
    ) -> list[WorkerSpec]:
        """Leaves spread over the worker processes; leaves that die (die_fraction) get
        one process per round they die in, which is killed when they do."""
        sc = self.scenario
        living = [p for p in plans if p.die_round is None]
        dying: dict[int, list[LeafPlan]] = {}
        for p in plans:
            if p.die_round is not None:
                dying.setdefault(p.die_round, []).append(p)
        nproc = sc.leaves.processes or min(sc.leaves.count, (os.cpu_count() or 1) * 2)
        nproc = min(nproc, len(living))
        groups = [(tuple(living[w::nproc]), False) for w in range(nproc)]
        groups += [(tuple(dying[r]), True) for r in sorted(dying)]
        return [
            WorkerSpec(
                worker=w,
                scenario=sc,
                api_url=api_url,
                transport=transport,
                amqp_host=amqp_host,
                amqp_port=amqp_port,
                aggregates_dir=self.run_dir / "aggregates",
                plans=group,
                dies=dies,
                tls_ca=str(self.env.tls.ca) if self.env.tls is not None else None,
            )
            for w, (group, dies) in enumerate(groups)
        ]


def _labels(hosts: list[LocalProcessHost]) -> dict[int, tuple[str, str, int]]:
    """pid -> (name, kind, leaves) of the leaf processes, for the memory timeline."""
    out: dict[int, tuple[str, str, int]] = {}
    for host in hosts:
        for proc in list(host.procs):
            pid = proc.pid
            if pid is None:
                continue
            worker = int(str(proc.name).split("-w", 1)[1].split("-", 1)[0])
            k = len(host.specs[worker].plans)
            out[int(pid)] = (f"leaf process {proc.name} ({k} leaves)", "leaves", k)
    return out


def _fetcher(
    api_url: str, credentials: list[dict[str, str]], into: Path
) -> Callable[[str], Path | None]:
    """Downloads an aggregate no leaf downloaded, as the first leaf (no notifications)."""

    def fetch(aggregation_id: str) -> Path | None:
        if (into / f"{aggregation_id}.npz").exists():  # a leaf downloaded it already
            return into / f"{aggregation_id}.npz"
        try:
            with Client(
                credentials[0], host=api_url, ssl=False, notifications=False, output_dir=into
            ) as client:
                return Path(client.file_download(aggregation_id))
        except BkSimError as exc:
            _log.warning("could not fetch aggregate %s: %s", aggregation_id, exc)
            return None

    return fetch


def _fetch_missing(records: list[RoundRecord], fetch: Callable[[str], Path | None]) -> None:
    """Download the aggregates no leaf downloaded while the platform still runs, so that
    validation (after a local platform is stopped) can judge those rounds too."""
    for rec in records:
        if rec.aggregated and rec.aggregation_id:
            fetch(rec.aggregation_id)
