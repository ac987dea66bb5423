"""``ChaosRun``: the run hooks of ``bk-sim chaos``, playing the scenario's fault schedule.

One daemon thread per scheduled fault waits for its trigger (a time after the leaves
spawned, or a round phase seen in the live event stream), injects the fault, waits out
its duration and undoes it. Every fault leaves ``fault_start`` and ``fault_end`` events in
the run's log (``fault_error`` when an injection failed), so the judgement and the reports
read what happened from the log alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bk_sim.broker import BrokerEndpoints
from bk_sim.chaos._injectors import BrokerInjector, CommandRunner, HttpInjector, run_command
from bk_sim.chaos._judge import judge_chaos
from bk_sim.chaos._proxy import ToxicProxy
from bk_sim.chaos._triggers import PhaseTracker
from bk_sim.engine import Check, HookContext, Judgement, RoundRecord, harness_event
from bk_sim.errors import BkSimError, ScenarioError
from bk_sim.scenario import PROXY_CHAOS, ChaosFaultSpec, Scenario

_log = logging.getLogger(__name__)

_BROKER_KINDS = ("kill_connections", "close_channel", "restart_broker")
_LEAF_TARGETED = ("kill_connections", "close_channel", "kill_leaf")
_JOIN_S = 15.0


def fault_name(index: int, fault: ChaosFaultSpec) -> str:
    """A fault's label: its ``name``, else ``<kind>-<1-based index>``."""
    return fault.name or f"{fault.kind}-{index + 1}"


def fault_targets(seed: int, index: int, fault: ChaosFaultSpec, leaf_count: int) -> list[int]:
    """Leaf indices a fault hits: all, or a seeded draw of ``fault.leaves`` of them."""
    if fault.kind not in _LEAF_TARGETED or fault.leaves >= 1.0:
        return list(range(leaf_count))
    n = max(1, round(fault.leaves * leaf_count))
    rng = np.random.default_rng([seed, 0xC4A05, index])
    return sorted(int(i) for i in rng.choice(leaf_count, size=n, replace=False))


def _http_rule(fault: ChaosFaultSpec) -> dict[str, Any]:
    h = fault.http
    assert h is not None
    return {
        "endpoint": h.endpoint,
        "status": h.status,
        "rate": h.rate,
        "count": h.count,
        "retry_after": h.retry_after,
        "latency_s": h.latency_s,
        "reset": h.reset,
        "drop_response": h.drop_response,
    }


class ChaosRun:
    """Run hooks (``SimulationRun(..., hooks=ChaosRun(scenario))``) for the chaos schedule."""

    section = "chaos"

    def __init__(
        self,
        scenario: Scenario,
        *,
        runner: CommandRunner = run_command,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self._runner = runner
        self._say = say or (lambda line: _log.info("%s", line))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.proxy: ToxicProxy | None = None
        self._broker: BrokerInjector | None = None
        self._http: HttpInjector | None = None
        self._ctx: HookContext | None = None
        self.tracker: PhaseTracker | None = None
        self._emit: Callable[[dict[str, Any]], None] = lambda e: None
        self._killed: dict[int, tuple[int, int]] = {}  # leaf -> (round, worker)
        #: leaf -> the aggregate it had downloaded when it was killed: the base of an upload
        #: that reached the platform unseen (a restarted leaf downloads newer ones later)
        self._killed_base: dict[int, str | None] = {}
        self._ended = False
        self._platform_lock = threading.Lock()

    # ------------------------------------------------------------------ hooks

    def prepare(
        self, endpoints: BrokerEndpoints, host: str | None, port: int | None
    ) -> tuple[str | None, int | None]:
        """Refuse an impossible schedule before any leaf starts; start the proxy if needed."""
        faults = self.scenario.chaos.faults
        if any(f.kind == "restart_broker" for f in faults):
            BrokerInjector(
                endpoints,
                tree_id="",
                branch_id="",
                restartable=self.scenario.chaos.broker_restartable,
                restart_command=self.scenario.chaos.restart_command,
            ).check_restartable()
        if any(f.kind in PROXY_CHAOS for f in faults):
            if host is None or port is None:
                raise ScenarioError("chaos: network faults need the AMQP transport and a broker")
            self.proxy = ToxicProxy(host, port, seed=self.scenario.seed)
            phost, pport = self.proxy.start()
            self._say(f"chaos: leaves reach the broker through the proxy {phost}:{pport}")
            return phost, pport
        return host, port

    def begin(self, ctx: HookContext) -> None:
        self._ctx = ctx
        self._emit = ctx.emit
        sc = self.scenario
        self.tracker = PhaseTracker(ctx.plans, sc.rounds)
        self.tracker.start()
        tree_id = ctx.credentials[0]["tree_id"] if ctx.credentials else ""
        if ctx.branch_id is not None:
            self._broker = BrokerInjector(
                ctx.endpoints,
                tree_id=tree_id,
                branch_id=ctx.branch_id,
                restartable=sc.chaos.broker_restartable,
                restart_command=sc.chaos.restart_command,
                runner=self._runner,
            )
            if ctx.admin is not None:
                self._http = HttpInjector(ctx.admin, ctx.branch_id, ctx.base_faults)
        for i, fault in enumerate(sc.chaos.faults):
            t = threading.Thread(
                target=self._play_fault, args=(i, fault), name=f"bk-sim-chaos-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)
        self._say(f"chaos: {len(sc.chaos.faults)} faults scheduled")

    def on_event(self, event: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.on_event(event)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._stop.set()
        for t in self._threads:
            t.join(_JOIN_S)
        self._infer_killed_uploads()
        if self.proxy is not None:
            self.proxy.stop()
        if self._broker is not None:
            self._broker.close()

    def judge(
        self,
        events: list[dict[str, Any]],
        records: list[RoundRecord] | None,
        judgement: Judgement,
    ) -> tuple[list[Check], dict[str, Any]]:
        checks, section = judge_chaos(self.scenario, events, records, judgement)
        if self.proxy is not None:
            section["proxy"] = {
                "address": ":".join(map(str, self.proxy.address or ())),
                "upstream": ":".join(map(str, self.proxy.upstream)),
                "connections_accepted": self.proxy.accepted,
                "bytes_forwarded": self.proxy.bytes_forwarded,
                "bytes_swallowed": self.proxy.bytes_swallowed,
            }
        return checks, section

    # ------------------------------------------------------------------ one fault

    def _play_fault(self, index: int, fault: ChaosFaultSpec) -> None:
        try:
            self._play_fault_inner(index, fault)
        except Exception as exc:  # noqa: BLE001 - a harness bug must show in the results
            _log.exception("chaos: fault %s failed", fault_name(index, fault))
            self._emit(
                harness_event(
                    "fault_error",
                    fault=fault_name(index, fault),
                    fault_kind=fault.kind,
                    error=f"unexpected: {type(exc).__name__}: {exc}",
                )
            )

    def _play_fault_inner(self, index: int, fault: ChaosFaultSpec) -> None:
        name = fault_name(index, fault)
        assert self.tracker is not None and self.tracker.started_at is not None
        if fault.at_s is not None:
            fired = not self._stop.wait(
                max(0.0, self.tracker.started_at + fault.at_s - time.time())
            )
        else:
            assert fault.round is not None
            fired = self.tracker.wait(fault.round, fault.when, self._stop) is not None
        if fired and fault.delay_s > 0:
            fired = not self._stop.wait(fault.delay_s)
        if not fired:
            self._emit(
                harness_event(
                    "fault_skipped",
                    fault=name,
                    fault_kind=fault.kind,
                    reason="the run ended before its trigger",
                )
            )
            return
        targets = fault_targets(self.scenario.seed, index, fault, self.scenario.leaves.count)
        assert self._ctx is not None  # faults fire only after begin()
        leaf_ids = [self._ctx.plans[i].leaf_id for i in targets]
        target = self._describe_target(fault, targets)
        round_now = fault.round or self.tracker.current_round
        self._emit(
            harness_event(
                "fault_start",
                fault=name,
                fault_kind=fault.kind,
                target=target,
                leaves=targets,
                round=round_now,
                duration_s=fault.duration_s,
                http=_http_rule(fault) if fault.http is not None else None,
            )
        )
        self._say(f"chaos: {name} ({fault.kind}) on {target}")
        try:
            self._start(fault, name, targets, leaf_ids, round_now)
        except (BkSimError, OSError) as exc:
            self._emit(
                harness_event("fault_error", fault=name, fault_kind=fault.kind, error=str(exc))
            )
            self._say(f"chaos: {name} could not be injected: {exc}")
            return
        if fault.duration_s is not None:
            self._stop.wait(fault.duration_s)
            try:
                self._finish(fault, name)
            except (BkSimError, OSError) as exc:
                self._emit(
                    harness_event(
                        "fault_error",
                        fault=name,
                        fault_kind=fault.kind,
                        error=f"could not undo: {exc}",
                    )
                )
        self._emit(harness_event("fault_end", fault=name, fault_kind=fault.kind, target=target))
        if fault.kind == "kill_leaf" and fault.restart:
            self._restart_killed(name, targets, round_now)

    def _describe_target(self, fault: ChaosFaultSpec, targets: Sequence[int]) -> str:
        if fault.kind in PROXY_CHAOS:
            return "network: every leaf-broker connection"
        if fault.kind == "restart_broker":
            return "broker"
        if fault.kind == "http":
            return f"platform http: {fault.http.endpoint if fault.http else '*'}"
        if fault.kind == "kill_platform":
            return "platform process"
        n = self.scenario.leaves.count
        return "all leaves" if len(targets) == n else f"{len(targets)} of {n} leaves"

    def _start(
        self,
        fault: ChaosFaultSpec,
        name: str,
        targets: Sequence[int],
        leaf_ids: Sequence[str],
        round_now: int,
    ) -> None:
        kind = fault.kind
        if kind in _BROKER_KINDS:
            if self._broker is None:
                raise ScenarioError(f"chaos: {kind} needs the local platform and a broker")
            if kind == "kill_connections":
                self._broker.kill_connections(leaf_ids)
            elif kind == "close_channel":
                self._broker.close_channel(leaf_ids)
            else:
                self._broker.restart()
            return
        if kind in PROXY_CHAOS:
            proxy = self.proxy
            assert proxy is not None
            if kind == "latency":
                proxy.set_latency(fault.latency_s, fault.jitter_s)
            elif kind == "bandwidth":
                assert fault.bandwidth_kbps is not None
                proxy.set_bandwidth(fault.bandwidth_kbps * 1000.0)
            elif kind == "blackhole":
                proxy.set_blackhole(True)
            elif kind == "slow_close":
                proxy.set_slow_close(fault.close_delay_s)
            else:
                proxy.reset_all()
            return
        if kind == "http":
            if self._http is None:
                raise ScenarioError("chaos: http faults need the local platform")
            self._http.add(name, _http_rule(fault))
            return
        if kind == "kill_leaf":
            self._kill(targets, round_now)
            return
        if kind == "kill_platform":
            self._kill_platform()
            return
        raise ScenarioError(f"chaos: unknown fault kind {kind!r}")

    def _finish(self, fault: ChaosFaultSpec, name: str) -> None:
        proxy = self.proxy
        if fault.kind == "http" and self._http is not None:
            self._http.remove(name)
        elif proxy is not None and fault.kind == "latency":
            proxy.set_latency(0.0, 0.0)
        elif proxy is not None and fault.kind == "bandwidth":
            proxy.set_bandwidth(None)
        elif proxy is not None and fault.kind == "blackhole":
            proxy.set_blackhole(False)
        elif proxy is not None and fault.kind == "slow_close":
            proxy.set_slow_close(0.0)

    def _kill_platform(self) -> None:
        """SIGKILL the local platform and start it again on the same port and data dir;
        leaves see refused connections meanwhile and retry. The runtime faults are set
        again on the new process."""
        handle = self._ctx.platform if self._ctx is not None else None
        if handle is None:
            raise ScenarioError("chaos: kill_platform needs the local platform")
        with self._platform_lock:
            pid = handle.pid
            t0 = time.monotonic()
            handle.restart(kill=True)
            self._emit(
                harness_event(
                    "platform_restarted",
                    killed_pid=pid,
                    pid=handle.pid,
                    down_s=round(time.monotonic() - t0, 3),
                )
            )
            if self._http is not None:
                self._http.use(handle.admin)

    # ------------------------------------------------------------------ leaves

    def _kill(self, targets: Sequence[int], round_now: int) -> None:
        assert self._ctx is not None and self.tracker is not None
        workers = self._ctx.workers
        for w in sorted({workers.worker_of(i) for i in targets}):
            pid = workers.kill(w)
            if pid is None:
                continue
            hosted = [p.index for p in workers.leaves_of(w)]
            self.tracker.set_down(hosted, True)
            for plan in workers.leaves_of(w):
                self._killed[plan.index] = (round_now, w)
                self._killed_base[plan.index] = self.tracker.last_download.get(plan.index)
                self._emit(
                    harness_event(
                        "leaf_died",
                        leaf=plan.index,
                        leaf_id=plan.leaf_id,
                        round=round_now,
                        reason=f"chaos: process {pid} killed (SIGKILL)",
                        process=w,
                    )
                )

    def _restart_killed(self, name: str, targets: Sequence[int], round_now: int) -> None:
        assert self.tracker is not None
        if round_now >= self.scenario.rounds:
            return
        if self.tracker.wait(round_now, "round_closed", self._stop) is None:
            return
        assert self._ctx is not None
        workers = self._ctx.workers
        for w in sorted({workers.worker_of(i) for i in targets}):
            known = frozenset(self.tracker.aggregates)
            workers.restart(w, round_now + 1, known)
            hosted = [p.index for p in workers.leaves_of(w)]
            self.tracker.set_down(hosted, False)
            self._emit(
                harness_event(
                    "leaf_restarted",
                    fault=name,
                    process=w,
                    leaves=hosted,
                    first_round=round_now + 1,
                )
            )

    def _infer_killed_uploads(self) -> None:
        """A leaf killed mid-upload may have reached the platform with no ``upload`` event:
        attribute such uploads (same leaf, its round) so the validator can regenerate them."""
        ctx = self._ctx
        if not self._killed or ctx is None or ctx.admin is None or ctx.branch_id is None:
            return
        admin = ctx.platform.admin if ctx.platform is not None else ctx.admin
        try:
            records = [RoundRecord.from_dict(r) for r in admin.rounds(ctx.branch_id)]
        except BkSimError as exc:
            _log.warning("chaos: could not read round records: %s", exc)
            return
        tracker = self.tracker
        assert tracker is not None
        by_id = {p.leaf_id: p for p in ctx.plans}
        killed_round = {ctx.plans[i].leaf_id: r for i, (r, _) in self._killed.items()}
        for rec in records:
            for u in rec.uploads:
                leaf, file_id = u.leaf_id, u.file_id
                if leaf not in killed_round or file_id in tracker.upload_ids:
                    continue
                if rec.round != killed_round[leaf]:
                    continue
                plan = by_id[leaf]
                self._emit(
                    harness_event(
                        "upload",
                        leaf=plan.index,
                        leaf_id=leaf,
                        round=killed_round[leaf],
                        file_id=file_id,
                        weighting=plan.weighting if u.weighting is None else u.weighting,
                        base_aggregation_id=self._killed_base.get(
                            plan.index, tracker.last_download.get(plan.index)
                        ),
                        inferred="the leaf was killed before it saw the answer; "
                        "the platform kept the upload",
                    )
                )
