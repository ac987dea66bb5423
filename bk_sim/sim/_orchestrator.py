"""The central run object: owns the scenario, broker, platform, leaf processes and log.

``SimulationRun(scenario).execute()`` is the whole of ``bk-sim run``: get a broker, start
(or reach) the platform, create the branch and its leaves, spawn the leaf processes,
stream their events into the log while showing progress, then judge what happened and
write ``results.json``. Nothing waits forever: the run has a deadline, leaves have
notification timeouts, and Ctrl-C stops everything and still writes what was measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import multiprocess as mp
import numpy as np

from bk_sim.broker import BrokerEndpoints, check_socket_capacity, provide_broker
from bk_sim.client import Client, Credentials, RetryConfig
from bk_sim.errors import BkSimError, ClientError, PlatformError, ScenarioError
from bk_sim.files import SECRET_MODE, atomic_write
from bk_sim.scenario import Scenario
from bk_sim.sim._agent import LeafPlan
from bk_sim.sim._checks import Check, Judgement, judge
from bk_sim.sim._eventlog import EventLog, harness_event, read_events, redact
from bk_sim.sim._synth import leaf_weightings
from bk_sim.sim._worker import WorkerSpec, worker_main

_log = logging.getLogger(__name__)

Progress = Callable[[str], None]
_SOCKET_MARGIN = 50
_PROGRESS_EVERY_S = 2.0
_WORKER_GRACE_S = 15.0
_DRAIN_BATCH = 2000
_PROBE_TIMEOUT_S = 15.0


@dataclass
class RunResult:
    """What ``bk-sim run`` reports; ``exit_code`` 0 passed, 1 a check failed."""

    run_dir: Path
    passed: bool
    results: dict[str, Any]

    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """0 passed, 1 a check failed, 2 the run was interrupted before it could finish."""
        if self.interrupted:
            return 2
        return 0 if self.passed else 1


@dataclass
class _Counters:
    started: int = 0
    connected: int = 0
    uploads: int = 0
    notified: int = 0
    downloads: int = 0
    errors: int = 0
    retries: int = 0
    reconnects: int = 0
    done: int = 0
    round: int = 0

    def line(self, total: int, rounds: int, elapsed: float) -> str:
        return (
            f"[{elapsed:6.1f}s] round {self.round}/{rounds}  leaves {self.started}/{total} "
            f"connected {self.connected}  uploads {self.uploads}  notified {self.notified}  "
            f"downloads {self.downloads}  retries {self.retries}  reconnects {self.reconnects}  "
            f"errors {self.errors}  done {self.done}"
        )

    def count(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        if kind == "leaf_started":
            self.started += 1
        elif kind == "connect":
            if e.get("attempt", 0) and int(e.get("attempt", 0)) > 0:
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


@dataclass
class HookContext:
    """What a run hook (chaos) may use while the leaves play.

    ``emit`` puts an event into the run's stream (thread-safe; it reaches the log and
    ``on_event`` like a leaf's). ``admin`` and ``branch_id`` are None for a remote platform.
    """

    scenario: Scenario
    run_dir: Path
    endpoints: BrokerEndpoints
    admin: Any
    branch_id: str | None
    base_faults: dict[str, Any]
    credentials: list[dict[str, str]]
    plans: list[LeafPlan]
    emit: Callable[[dict[str, Any]], None]
    workers: WorkerControl


class RunHooks(Protocol):
    """Optional hooks into a run (``bk-sim chaos``), all called on the orchestrator thread;
    none may block it for long."""

    #: The results.json key ``judge``'s section is written under.
    section: str

    def prepare(
        self, endpoints: BrokerEndpoints, host: str | None, port: int | None
    ) -> tuple[str | None, int | None]:
        """Before any leaf starts: refuse what cannot be done; where leaves connect for
        AMQP (e.g. a proxy in front of ``host:port``)."""
        ...

    def begin(self, ctx: HookContext) -> None:
        """The leaves are spawned; the run's resources are in ``ctx``."""
        ...

    def on_event(self, event: dict[str, Any]) -> None:
        """Every event of the run, as it is logged."""
        ...

    def end(self) -> None:
        """The leaves are done or being stopped (also on errors and Ctrl-C); idempotent."""
        ...

    def judge(
        self,
        events: list[dict[str, Any]],
        records: list[dict[str, Any]] | None,
        judgement: Judgement,
    ) -> tuple[list[Check], dict[str, Any]]:
        """Extra checks and a results.json section of their own."""
        ...


@dataclass
class WorkerControl:
    """The run's leaf processes: kill one, or start its leaves again from a later round."""

    ctx: Any
    specs: list[WorkerSpec]
    events: Any
    stop: Any
    procs: list[Any] = field(default_factory=list)
    _live: dict[int, Any] = field(default_factory=dict)

    def start_all(self) -> None:
        for spec in self.specs:
            self._spawn(spec)

    def _spawn(self, spec: WorkerSpec) -> Any:
        suffix = f"-r{spec.incarnation}" if spec.incarnation else ""
        proc = self.ctx.Process(
            target=worker_main,
            args=(spec, self.events, self.stop),
            name=f"bk-sim-w{spec.worker}{suffix}",
        )
        proc.start()
        self.procs.append(proc)
        self._live[spec.worker] = proc
        return proc

    def worker_of(self, leaf_index: int) -> int:
        """The worker (process slot) hosting a leaf."""
        for spec in self.specs:
            if any(p.index == leaf_index for p in spec.plans):
                return spec.worker
        raise KeyError(leaf_index)

    def leaves_of(self, worker: int) -> list[LeafPlan]:
        return list(self.specs[worker].plans)

    def kill(self, worker: int) -> int | None:
        """SIGKILL the live process of ``worker``; its pid, or None when it is not running."""
        proc = self._live.get(worker)
        if proc is None or not proc.is_alive():
            return None
        proc.kill()
        proc.join(timeout=5)
        self._unstick_events()
        return int(proc.pid)

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

    def restart(self, worker: int, first_round: int, known: frozenset[str]) -> Any:
        """A new process for ``worker``'s leaves, playing rounds ``first_round`` on."""
        old = self.specs[worker]
        plans = tuple(
            replace(p, first_round=first_round, known_aggregates=known, start_delay_s=0.0)
            for p in old.plans
        )
        spec = replace(old, plans=plans, incarnation=old.incarnation + 1)
        self.specs[worker] = spec
        return self._spawn(spec)


def plan_leaves(scenario: Scenario, credentials: list[dict[str, str]]) -> list[LeafPlan]:
    """Each leaf's weighting and schedule, a pure function of the scenario's seed."""
    spec = scenario.leaves
    n = spec.count
    weightings = leaf_weightings(scenario.seed, spec.weighting, n)
    rng = np.random.default_rng([scenario.seed, 0x5EED])
    jitter = rng.uniform(0.0, spec.start_jitter_s, n) if spec.start_jitter_s > 0 else np.zeros(n)
    stragglers = set(
        rng.choice(n, size=round(spec.stragglers.fraction * n), replace=False).tolist()
    )
    dying = set(rng.choice(n, size=round(spec.dropouts.die_fraction * n), replace=False).tolist())
    plans = []
    for i in range(n):
        skips = frozenset(
            r
            for r in range(1, scenario.rounds + 1)
            if spec.dropouts.skip_fraction > 0 and rng.random() < spec.dropouts.skip_fraction
        )
        die_round = int(rng.integers(1, scenario.rounds + 1)) if i in dying else None
        plans.append(
            LeafPlan(
                index=i,
                credentials=credentials[i],
                weighting=float(weightings[i]),
                start_delay_s=float(jitter[i]),
                straggle_s=spec.stragglers.delay_s if i in stragglers else 0.0,
                skip_rounds=skips,
                die_round=die_round,
            )
        )
    return plans


class SimulationRun:
    """One run of a scenario; build it, call ``execute()``."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        progress: Progress | None = None,
        run_dir: Path | None = None,
        may_enable_plugin: bool = False,
        hooks: RunHooks | None = None,
    ) -> None:
        # Weightings that overflow are a ScenarioError: raise it before a platform, a broker
        # or a chaos proxy is started, not halfway through the run.
        leaf_weightings(scenario.seed, scenario.leaves.weighting, scenario.leaves.count)
        self.scenario = scenario
        self._hooks = hooks
        self._admin: Any = None
        self._branch_id: str | None = None
        self._base_faults: dict[str, Any] = {}
        self._endpoints: BrokerEndpoints | None = None
        self._may_enable_plugin = may_enable_plugin
        self._say = progress or (lambda line: _log.info("%s", line))
        if hooks is None and scenario.chaos.faults:
            self._say(
                f"the scenario schedules {len(scenario.chaos.faults)} chaos faults; "
                "bk-sim run ignores them (bk-sim chaos plays them)"
            )
        self._run_dir_given = run_dir is not None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_dir = run_dir or Path(scenario.report.dir) / f"{scenario.name}-{stamp}"

    def _make_run_dir(self) -> None:
        """Create the run folder: a one-line error when report.dir is unusable, and a
        suffix when another run of the scenario started in the same second."""
        base = self.run_dir
        for n in range(2, 100):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=False)
                (self.run_dir / "aggregates").mkdir()
                return
            except FileExistsError:
                if self._run_dir_given:
                    raise ScenarioError(f"{self.run_dir}: the run folder already exists") from None
                self.run_dir = base.with_name(f"{base.name}-{n}")
            except OSError as exc:
                raise ScenarioError(
                    f"report.dir: cannot create the run folder {self.run_dir}: "
                    f"{exc.strerror or exc}"
                ) from exc
        raise ScenarioError(f"report.dir: too many run folders named {base}-N")

    def execute(self) -> RunResult:
        sc = self.scenario
        self._make_run_dir()
        aggregates = self.run_dir / "aggregates"
        log = EventLog(self.run_dir / "events.jsonl")
        started_at = time.time()
        interrupted = False
        records: list[dict[str, Any]] | None = None
        api_url = ""
        credentials: list[dict[str, str]] = []
        try:
            with contextlib.ExitStack() as stack:
                endpoints = self._broker(stack)
                transport = sc.transport
                if endpoints.provider == "none" and transport == "amqp":
                    transport = "websocket"
                    self._say("no broker: leaves use the WebSocket transport")
                log.write(
                    harness_event(
                        "run_started",
                        scenario=sc.name,
                        broker=endpoints.provider,
                        broker_reason=endpoints.reason,
                        transport=transport,
                    )
                )
                platform = stack.enter_context(self._platform(endpoints, log))
                api_url, credentials, fetch_records = platform
                log.add_secrets(tuple(c["session_token"] for c in credentials))
                if transport == "amqp":
                    check_socket_capacity(endpoints, sc.leaves.count + _SOCKET_MARGIN)
                amqp_host, amqp_port = (
                    endpoints.amqp_host_port() if endpoints.amqp_url else (None, None)
                )
                if self._hooks is not None:
                    amqp_host, amqp_port = self._hooks.prepare(endpoints, amqp_host, amqp_port)
                plans = plan_leaves(sc, credentials)
                self._endpoints = endpoints
                try:
                    interrupted = self._play(
                        plans, api_url, transport, amqp_host, amqp_port, log, credentials
                    )
                finally:
                    if self._hooks is not None:
                        self._hooks.end()
                try:
                    records = fetch_records()
                except BkSimError as exc:
                    self._say(f"could not read the platform's round records: {exc}")
                    log.write(harness_event("records_unavailable", error=str(exc)))
                if records and credentials:
                    _fetch_missing(records, _fetcher(api_url, credentials, aggregates))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            log.close()
        log_path = self.run_dir / "events.jsonl"
        events = list(read_events(log_path)) if log_path.exists() else []
        self._say("validating aggregates against the reference")
        # A local platform is stopped by now: only a remote one can still be asked.
        fetch = None
        if credentials and sc.platform.mode == "remote":
            fetch = _fetcher(api_url, credentials, aggregates)
        judgement = judge(
            sc,
            events,
            records,
            aggregates,
            fetch=fetch,
            run_started=started_at,
        )
        hook_section: dict[str, Any] | None = None
        if self._hooks is not None:
            hook_checks, hook_section = self._hooks.judge(events, records, judgement)
            judgement.checks.extend(hook_checks)
        if interrupted:
            judgement.checks.append(Check("run: completed", False, "interrupted (Ctrl-C)"))
        results = _results(sc, judgement, self.run_dir, started_at, interrupted)
        if self._hooks is not None and hook_section is not None:
            results[self._hooks.section] = hook_section
        _write_json(self.run_dir / "results.json", results)
        try:  # junit.xml and report.html; a report failure never changes the verdict
            from bk_sim.report import render_run

            render_run(self.run_dir)
        except Exception:  # noqa: BLE001
            _log.exception("could not render the report of %s", self.run_dir)
        return RunResult(self.run_dir, judgement.passed, results, interrupted)

    # ------------------------------------------------------------------ resources

    def _broker(self, stack: contextlib.ExitStack) -> BrokerEndpoints:
        b = self.scenario.broker
        if self.scenario.transport == "websocket" and b.provider == "auto" and not b.amqp_url:
            provider = "none"
        else:
            provider = b.provider
        endpoints: BrokerEndpoints = stack.enter_context(
            provide_broker(
                provider,
                amqp_url=b.amqp_url,
                management_url=b.management_url,
                may_enable_plugin=self._may_enable_plugin,
                on_status=self._say,
            )
        )
        self._say(f"broker: {endpoints.reason}")
        return endpoints

    @contextlib.contextmanager
    def _platform(
        self, endpoints: BrokerEndpoints, log: EventLog
    ) -> Iterator[tuple[str, list[dict[str, str]], Callable[[], list[dict[str, Any]] | None]]]:
        sc = self.scenario
        p = sc.platform
        if p.mode == "remote":
            log.add_secrets((p.admin_token or "",))
            yield _remote(sc, self._say)
            return
        from bk_sim.platform import start_platform

        token = secrets.token_urlsafe(24)
        log.add_secrets((token,))
        self._say("starting the reference platform")
        broker_urls = (
            {"amqp_url": endpoints.amqp_url, "management_url": endpoints.management_url}
            if endpoints.amqp_url and endpoints.management_url
            else {"no_amqp": True}
        )
        handle = start_platform(self.run_dir / "platform", admin_token=token, **broker_urls)
        try:
            admin = handle.admin
            tree_id = admin.create_tree(f"bk-sim-{sc.name}")
            branch = admin.create_branch(
                tree_id,
                name=sc.name,
                strategy=p.strategy,
                quorum=p.quorum,
                round_timeout_s=p.round_timeout_s,
                trim_fraction=p.trim_fraction,
            )
            branch_id = str(branch["branch_id"])
            creds = admin.create_leaves(branch_id, sc.leaves.count)
            self._admin, self._branch_id = admin, branch_id
            self._base_faults = dataclasses.asdict(sc.platform.faults)
            admin.set_faults(branch_id, self._base_faults)
            admin.set_run_status(branch_id, "start")
            _write_credentials(self.run_dir / "leaves.json", creds)
            self._say(f"platform at {handle.url}: branch {branch_id}, {len(creds)} leaves")
            try:
                yield handle.url, creds, lambda: admin.rounds(branch_id)
            finally:
                with contextlib.suppress(BkSimError):
                    admin.delete_tree(tree_id)
        finally:
            handle.stop()

    # ------------------------------------------------------------------ the leaves

    def _play(
        self,
        plans: list[LeafPlan],
        api_url: str,
        transport: str,
        amqp_host: str | None,
        amqp_port: int | None,
        log: EventLog,
        credentials: list[dict[str, str]] | None = None,
    ) -> bool:
        """Run the leaf processes to the end; True when interrupted."""
        sc = self.scenario
        nproc = sc.leaves.processes or min(sc.leaves.count, (os.cpu_count() or 1) * 2)
        ctx = mp.get_context("spawn")
        events = ctx.Queue()
        stop = ctx.Event()
        specs = [
            WorkerSpec(
                worker=w,
                scenario=sc,
                api_url=api_url,
                transport=transport,
                amqp_host=amqp_host,
                amqp_port=amqp_port,
                aggregates_dir=self.run_dir / "aggregates",
                plans=tuple(plans[w::nproc]),
            )
            for w in range(nproc)
        ]
        t0 = time.time()
        log.write(harness_event("leaves_spawning", processes=nproc, leaves=len(plans)))
        workers = WorkerControl(ctx, specs, events, stop)
        procs = workers.procs  # grows when a hook restarts a worker
        hooks = self._hooks
        counters = _Counters()
        deadline = time.monotonic() + sc.timeouts.run_s
        last_progress = 0.0
        interrupted = False
        try:
            workers.start_all()
            if hooks is not None:
                assert self._endpoints is not None
                hooks.begin(
                    HookContext(
                        scenario=sc,
                        run_dir=self.run_dir,
                        endpoints=self._endpoints,
                        admin=self._admin,
                        branch_id=self._branch_id,
                        base_faults=self._base_faults,
                        credentials=credentials or [],
                        plans=plans,
                        emit=events.put,
                        workers=workers,
                    )
                )
            while True:
                try:
                    e = events.get(timeout=0.25)
                    log.write(e)
                    counters.count(e)
                    if hooks is not None:
                        hooks.on_event(e)
                    # Drain what is already there without waiting, but a bounded batch: a
                    # stream that never pauses must not starve the deadline and progress checks.
                    for _ in range(_DRAIN_BATCH):
                        e = events.get_nowait()
                        log.write(e)
                        counters.count(e)
                        if hooks is not None:
                            hooks.on_event(e)
                except queue.Empty:
                    pass
                now = time.monotonic()
                if now - last_progress >= _PROGRESS_EVERY_S:
                    self._say(counters.line(len(plans), sc.rounds, time.time() - t0))
                    last_progress = now
                    log.flush()
                if not any(p.is_alive() for p in procs):
                    break
                if now > deadline:
                    self._say(f"run deadline of {sc.timeouts.run_s:g} s passed: stopping leaves")
                    log.write(harness_event("run_deadline", run_s=sc.timeouts.run_s))
                    stop.set()
                    break
        except KeyboardInterrupt:
            self._say("interrupted: stopping leaves and writing what was measured")
            interrupted = True
        finally:
            # Also on an error (a hook, the log): leaf processes must not play on unwatched.
            stop.set()
            if hooks is not None:
                hooks.end()  # faults undone, and their last events drained below
            self._stop_workers(procs, events, log, counters)
        self._say(counters.line(len(plans), sc.rounds, time.time() - t0))
        return interrupted

    def _stop_workers(
        self, procs: list[Any], events: Any, log: EventLog, counters: _Counters
    ) -> None:
        end = time.monotonic() + _WORKER_GRACE_S
        while any(p.is_alive() for p in procs) and time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                e = events.get(timeout=0.2)
                log.write(e)
                counters.count(e)
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
            if p.exitcode not in (0, None):
                log.write(harness_event("worker_exit", process=p.name, exitcode=p.exitcode))
        # Not get_nowait: what this process put itself (chaos hooks) may still sit in the
        # queue's feeder thread, and an inferred upload lost here fails validation.
        with contextlib.suppress(queue.Empty, OSError, ValueError):
            while True:
                e = events.get(timeout=0.2)
                log.write(e)
                counters.count(e)


# ---------------------------------------------------------------------- helpers


def _write_credentials(path: Path, creds: list[dict[str, str]]) -> None:
    """Leaf credentials for the run, readable by their owner only (never half-written)."""
    atomic_write(path, json.dumps(creds, indent=2), mode=SECRET_MODE)


def _remote(
    sc: Scenario, say: Progress
) -> tuple[str, list[dict[str, str]], Callable[[], list[dict[str, Any]] | None]]:
    """A remote platform: the leaves' credentials from its file, checked against it, and
    its round records when the scenario gives its admin API."""
    p = sc.platform
    assert p.host is not None and p.credentials_file is not None
    try:
        raw = json.loads(Path(p.credentials_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ScenarioError(
            f"platform.credentials_file {p.credentials_file}: cannot read leaf credentials: {exc}"
        ) from exc
    if not isinstance(raw, list) or len(raw) < sc.leaves.count:
        have = len(raw) if isinstance(raw, list) else 0
        raise ScenarioError(
            f"platform.credentials_file {p.credentials_file}: holds {have} leaves, "
            f"the scenario needs leaves.count = {sc.leaves.count}"
        )
    creds = [Credentials.from_dict(c).to_dict() for c in raw[: sc.leaves.count]]
    _probe_remote(p.host, creds[0])
    say(f"remote platform {p.host}: {len(creds)} leaves from {p.credentials_file}")
    fetch: Callable[[], list[dict[str, Any]] | None] = lambda: None  # noqa: E731
    if p.admin_url and p.admin_token:
        from bk_sim.platform import AdminClient

        admin = AdminClient(p.admin_url, p.admin_token)
        branch = creds[0]["branch_id"]
        fetch = lambda: admin.rounds(branch)  # noqa: E731
    return p.host, creds, fetch


def _probe_remote(host: str, credentials: dict[str, str]) -> None:
    """Ask the platform once, as the first leaf, before any leaf starts: a platform that is
    down or refuses the credentials is a run that could not be made (exit 2), not every
    leaf failing after its retries (exit 1)."""
    retry = RetryConfig(max_retries=1, backoff_factor=0.5, total_timeout=_PROBE_TIMEOUT_S)
    try:
        with Client(credentials, host=host, ssl=False, notifications=False, retry_config=retry):
            pass
    except ClientError as exc:
        leaf = credentials.get("id")
        raise PlatformError(f"platform.host {host}: did not accept leaf {leaf}: {exc}") from exc


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


def _fetch_missing(records: list[dict[str, Any]], fetch: Callable[[str], Path | None]) -> None:
    """Download the aggregates no leaf downloaded while the platform still runs, so that
    validation (after a local platform is stopped) can judge those rounds too."""
    for rec in records:
        agg = rec.get("aggregation_id")
        if rec.get("status") == "aggregated" and agg:
            fetch(str(agg))


def _write_json(path: Path, data: Any) -> None:
    """Strict JSON (an infinite error, e.g. of a NaN aggregate, becomes null: ``Infinity``
    breaks jq and JSON.parse), through a temporary name so it is never half-written."""
    atomic_write(path, json.dumps(_finite(data), indent=2, default=str, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _results(
    sc: Scenario, j: Judgement, run_dir: Path, started_at: float, interrupted: bool
) -> dict[str, Any]:
    ended = time.time()
    # redact: the scenario's broker URLs may carry passwords, and results.json is shared.
    return redact(
        {
            "passed": j.passed,
            "exit_code": 2 if interrupted else (0 if j.passed else 1),
            "verdict": _verdict(j),
            "scenario": sc.to_dict(),
            "run": {
                "dir": str(run_dir),
                "started_at": datetime.fromtimestamp(started_at, timezone.utc).isoformat(),
                "ended_at": datetime.fromtimestamp(ended, timezone.utc).isoformat(),
                "duration_s": ended - started_at,
                "interrupted": interrupted,
            },
            "checks": [c.to_dict() for c in j.checks],
            "rounds": j.rounds,
            "notifications": j.notifications,
            "downloads": j.downloads,
            "leaves": j.leaves,
            "timings": j.timings,
        }
    )


def _verdict(j: Judgement) -> str:
    failed = [c for c in j.checks if not c.passed]
    if not failed:
        return f"passed: all {len(j.checks)} checks"
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"failed: {first.name}: {first.message}{more}"
