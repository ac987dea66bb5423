"""``LoadRun``: one ``bk-sim load``, headless, with the web UI, or as master / worker.

Locust in library mode (``locust.env.Environment``): the run gets a broker, starts (or
reaches) the platform, creates the leaves, makes the upload payloads, then lets Locust's
runner drive ``LeafUser``s. Locust writes its own CSVs (``StatsCSVFileWriter``) and HTML
report (``get_html_report``); bk-sim adds ``results.json`` with the verdict: thresholds
(``load.p95_ms``, ``load.error_rate``) and, against the local platform, a reconciliation
of the HTTP attempts Locust counted with the ones the platform answered.

Distributed mode is Locust's own: ``--master`` runs the platform side and the load shape,
``--worker`` processes (any machine) run users. A worker asks the master for its setup
(platform URL, broker address, its share of leaf credentials) with a custom message; its
users wait for that before they start. Worker tallies ride on Locust's worker reports.
This module must be imported after gevent has monkey-patched (``bk-sim load`` does).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gevent
import gevent.event
from locust.env import Environment
from locust.exception import RPCError
from locust.html import get_html_report
from locust.runners import WORKER_REPORT_INTERVAL, MasterRunner, Runner
from locust.stats import (
    CSV_STATS_INTERVAL_SEC,
    PERCENTILES_TO_REPORT,
    StatsCSVFileWriter,
    StatsEntry,
    stats_history,
)

from bk_sim.broker import BrokerEndpoints, check_socket_capacity
from bk_sim.engine import Check, EventLog, PlatformNeeds, RunEnvironment, StatusBoard, harness_event
from bk_sim.errors import BkSimError, ScenarioError
from bk_sim.files import atomic_write
from bk_sim.load._observer import HTTP_TYPES, NOTIFY
from bk_sim.load._payloads import build_payloads
from bk_sim.load._rounds import LoadRounds, fetch_aggregates, judge_load_rounds, wait_rounds_closed
from bk_sim.load._shape import stages_shape
from bk_sim.load._user import LoadContext, user_class
from bk_sim.scenario import OWN_IMPLEMENTATION, Scenario

_log = logging.getLogger(__name__)

Progress = Callable[[str], None]
Role = Literal["local", "master", "worker"]

#: Rounds close on this timeout (with a quorum of 1) when the scenario sets none: load
#: users come and go, so "every leaf uploaded" may never happen.
DEFAULT_ROUND_TIMEOUT_S = 5.0
#: How long a stopping user may finish its current task before it is killed.
STOP_GRACE_S = 5.0
WORKERS_TIMEOUT_S = 60.0
_SOCKET_MARGIN = 50
_SETUP = "bk_sim_setup"
_HELLO = "bk_sim_hello"


@dataclass(frozen=True)
class LoadOptions:
    """How to run: role, web UI, and Locust's distributed-mode addresses."""

    role: Role = "local"
    web: bool = False
    web_host: str = "127.0.0.1"
    web_port: int = 8089
    master_host: str = "127.0.0.1"
    master_port: int = 5557
    master_bind_host: str = "*"
    expect_workers: int = 1
    advertise_host: str | None = None
    run_dir: Path | None = None


@dataclass
class LoadResult:
    """``exit_code`` 0 passed, 1 a threshold or check failed, 2 the load could not run."""

    exit_code: int
    run_dir: Path | None
    results: dict[str, Any] = field(default_factory=dict)


def check_load_spec(sc: Scenario) -> None:
    """Cross-field rules of ``load`` (the loader checks types and ranges)."""
    spec = sc.load
    where = sc.source or sc.name
    published = sorted(
        {sc.client.implementation, *(sc.leaves.implementations or {})} - {OWN_IMPLEMENTATION}
    )
    if published:
        key = "leaves.implementations" if sc.leaves.implementations else "client.implementation"
        raise ScenarioError(
            f"{where}: {key}: bk-sim load cannot drive {', '.join(published)}: a Locust user "
            "runs bk_sim's client inside the gevent-patched load process, and a published "
            "client needs its own env and process; measure it with bk-sim run or bk-sim chaos"
        )
    if sc.platform.tls:
        raise ScenarioError(
            f"{where}: platform.tls: bk-sim load does not run over TLS yet (its users are not "
            "given the run's CA); use bk-sim run or bk-sim chaos for TLS scenarios"
        )
    if spec.wait_max_s < spec.wait_min_s:
        raise ScenarioError(
            f"{where}: load.wait_max_s: expected a number >= load.wait_min_s "
            f"({spec.wait_min_s}); found {spec.wait_max_s}"
        )
    t = spec.tasks
    if not any((t.upload, t.download, t.metrics, t.branch_config)):
        raise ScenarioError(f"{where}: load.tasks: every weight is 0; give one task a weight")
    last = 0.0
    for i, stage in enumerate(spec.stages):
        if stage.until_s <= last:
            raise ScenarioError(
                f"{where}: load.stages[{i}].until_s: expected a time after the previous "
                f"stage's ({last:g}); found {stage.until_s:g}"
            )
        last = stage.until_s


def peak_users(sc: Scenario) -> int:
    spec = sc.load
    return max([spec.users, *(s.users for s in spec.stages)])


def load_seconds(sc: Scenario) -> float:
    spec = sc.load
    return spec.stages[-1].until_s if spec.stages else spec.duration_s


class LoadRun:
    """One ``bk-sim load``; build it, call ``execute()``."""

    def __init__(
        self,
        scenario: Scenario,
        options: LoadOptions | None = None,
        *,
        progress: Progress | None = None,
    ) -> None:
        check_load_spec(scenario)
        self.scenario = scenario
        self.options = options or LoadOptions()
        self.env = RunEnvironment(
            scenario, kind="load", run_dir=self.options.run_dir, progress=progress
        )
        self._say = self.env.say
        self._ended = gevent.event.Event()

    @property
    def run_dir(self) -> Path:
        return self.env.run_dir

    def execute(self) -> LoadResult:
        if self.options.role == "worker":
            return self._worker()
        return self._drive()

    # ------------------------------------------------------------------ local / master

    def _drive(self) -> LoadResult:
        sc, opt, env = self.scenario, self.options, self.env
        env.make_run_dir()
        checks: list[Check] = []
        interrupted = False
        with contextlib.ExitStack() as stack:
            endpoints = env.broker(stack, provide_for_remote=False)
            transport = env.transport(endpoints, who="users")
            spare = opt.expect_workers if opt.role == "master" else 0
            need = max(peak_users(sc), sc.leaves.count) + spare
            adv = opt.advertise_host
            p = sc.platform
            needs = PlatformNeeds(
                leaves=need,
                tree_name=f"bk-sim-load-{sc.name}",
                quorum=p.quorum or 1,
                round_timeout_s=p.round_timeout_s or DEFAULT_ROUND_TIMEOUT_S,
                purpose=f"the load needs {need} (peak users, leaves.count, one spare per worker)",
                bind_host="0.0.0.0"
                if adv and adv not in ("127.0.0.1", "localhost")
                else "127.0.0.1",
                advertise_host=adv,
                write_credentials=False,
                probe_remote=False,
            )
            access = stack.enter_context(env.platform_for(endpoints, needs))
            api_url, creds, admin = access.api_url, access.credentials, access.admin
            if transport == "amqp" and sc.load.notifications and endpoints.amqp_url:
                check_socket_capacity(endpoints, peak_users(sc) + _SOCKET_MARGIN)
            amqp_host, amqp_port = self._amqp_address(endpoints)
            amqp_ssl = self._amqp_ssl(endpoints)
            for scratch in ("payloads", "downloads"):  # also when the run fails
                stack.callback(shutil.rmtree, self.run_dir / scratch, ignore_errors=True)
            payloads = build_payloads(sc, self.run_dir / "payloads")
            self._say(
                f"{len(payloads.paths)} payloads of {payloads.mean_bytes / 1e3:,.1f} kB made "
                f"in {payloads.build_s:.2f} s"
            )
            ctx = LoadContext(sc, self.run_dir / "downloads")
            ctx.payloads = payloads
            ctx.configure(
                api_url=api_url,
                credentials=creds,
                transport=transport,
                amqp_host=amqp_host,
                amqp_port=amqp_port,
                amqp_ssl=amqp_ssl,
            )
            locust_env = self._environment(ctx, api_url)
            runner = self._runner(locust_env)
            setup = {
                "api_url": api_url,
                "transport": transport,
                "amqp_host": amqp_host,
                "amqp_port": amqp_port,
                "amqp_ssl": amqp_ssl,
            }
            if isinstance(runner, MasterRunner):
                self._serve_workers(runner, ctx, creds, setup)
            if admin is not None:
                admin.reset_stats()
            csv_base = str(self.run_dir / "locust")
            writer = StatsCSVFileWriter(
                locust_env, PERCENTILES_TO_REPORT, csv_base, full_history=True
            )
            greenlets = [gevent.spawn(writer), gevent.spawn(stats_history, runner)]
            load_started = time.time()
            # SIGTERM ends the load like Ctrl-C (a shell's background job ignores SIGINT).
            gevent.signal_handler(signal.SIGTERM, self._ended.set)
            try:
                if opt.web:
                    self._web(locust_env)
                else:
                    interrupted = self._headless(locust_env, runner)
            except KeyboardInterrupt:
                interrupted = not opt.web  # with the web UI, Ctrl-C is how a run ends
                self._say("stopping users and writing what was measured")
            load_s = time.time() - load_started
            self._stop(runner)
            gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)  # one more CSV pass with final stats
            ctx.close_all()
            platform_stats = admin.stats() if admin is not None else None
            # The last round closes on its timeout after the users stop; its aggregate,
            # like every other, is fetched while the platform runs and judged below.
            records = wait_rounds_closed(access.rounds, (needs.round_timeout_s or 0.0) + 2.0)
            if records:
                fetch_aggregates(records, api_url, creds[0], self.run_dir / "aggregates")
            aggregated = (
                sum(r.status == "aggregated" for r in records) if records is not None else None
            )
            if runner is not None:
                runner.quit()
            for g in greenlets:
                g.kill(block=True)
            writer.close_files()
            atomic_write(
                self.run_dir / "locust_report.html",
                get_html_report(locust_env, show_download_link=False),
            )
            summary = summarise(locust_env)
            checks = judge(sc, summary, platform_stats, reconcile=not opt.web and not interrupted)
        rounds = LoadRounds()
        if records is not None:
            self._say(f"validating {len(records)} rounds' aggregates against the reference")
            rounds = judge_load_rounds(sc, records, payloads, self.run_dir / "aggregates")
            checks.extend(rounds.checks)
        sections = {
            "payloads": {
                "variants": len(payloads.paths),
                "mean_bytes": payloads.mean_bytes,
                "build_s": payloads.build_s,
            },
            **summary,
            "client": ctx.counters.take(),
            "platform_requests": platform_stats,
            "platform_rounds_aggregated": aggregated,
            **rounds.section(),
            "files": {
                "stats_csv": "locust_stats.csv",
                "history_csv": "locust_stats_history.csv",
                "failures_csv": "locust_failures.csv",
                "html": "locust_report.html",
            },
        }
        run = {
            "role": opt.role,
            "workers": opt.expect_workers if opt.role == "master" else 0,
            "load_s": load_s,
            "web": opt.web,
        }
        # bk-sim's own report (checks, rounds) beside Locust's: it reads an event log, and
        # a load's events are Locust's (its CSVs), so the log holds only the run's span.
        log = EventLog(self.run_dir / "events.jsonl")
        log.write(harness_event("run_started", t=load_started))
        log.write(harness_event("load_ended", t=load_started + load_s))
        log.close()
        result = env.finish(checks, sections, interrupted=interrupted, run=run)
        return LoadResult(result.exit_code, self.run_dir, result.results)

    def _environment(self, ctx: LoadContext, api_url: str) -> Environment:
        sc = self.scenario
        shape = stages_shape(sc.load) if sc.load.stages else None
        env = Environment(
            user_classes=[user_class(ctx)],
            shape_class=shape,
            host=api_url,
            stop_timeout=STOP_GRACE_S,
        )
        counters = ctx.counters

        def merge(client_id: str, data: dict[str, Any]) -> None:
            for key, n in data.get("bk_sim", {}).items():
                counters.add(key, n)

        env.events.worker_report.add_listener(merge)
        return env

    def _runner(self, env: Environment) -> Runner:
        opt = self.options
        if opt.role == "master":
            try:
                return env.create_master_runner(opt.master_bind_host, opt.master_port)
            except RPCError as exc:  # e.g. the port is taken
                raise BkSimError(
                    f"Locust master on {opt.master_bind_host}:{opt.master_port}: {exc}"
                ) from exc
        return env.create_local_runner()

    def _serve_workers(
        self,
        runner: MasterRunner,
        ctx: LoadContext,
        creds: list[dict[str, str]],
        setup: dict[str, Any],
    ) -> None:
        """Answer each worker's hello with its setup; wait for ``expect_workers``."""
        width = self.options.expect_workers
        ordinals: dict[str, int] = {}

        def hello(environment: Environment, msg: Any, **_: Any) -> None:
            k = ordinals.setdefault(msg.node_id, len(ordinals))
            share = creds[k % width :: width]
            runner.send_message(_SETUP, {**setup, "credentials": share}, client_id=msg.node_id)
            _log.info("worker %s gets %d leaves", msg.node_id, len(share))

        runner.register_message(_HELLO, hello)
        self._say(
            f"master on {self.options.master_bind_host}:{self.options.master_port}: "
            f"waiting for {width} worker(s)"
        )
        deadline = time.monotonic() + WORKERS_TIMEOUT_S
        while len(ordinals) < width or runner.worker_count < width:
            if time.monotonic() > deadline:
                raise BkSimError(
                    f"only {min(len(ordinals), runner.worker_count)} of {width} Locust workers "
                    f"connected to {self.options.master_bind_host}:{self.options.master_port} "
                    f"within {WORKERS_TIMEOUT_S:.0f} s"
                )
            gevent.sleep(0.2)
        self._say(f"{width} worker(s) ready")

    def _headless(self, env: Environment, runner: Runner) -> bool:
        sc = self.scenario
        spec = sc.load
        seconds = load_seconds(sc)
        if spec.stages:
            runner.start_shape()
            self._say(f"load: {len(spec.stages)} stages over {seconds:g} s")
        else:
            runner.start(spec.users, spawn_rate=spec.spawn_rate)
            self._say(f"load: {spec.users} users at {spec.spawn_rate:g}/s for {seconds:g} s")
        t0 = time.monotonic()
        with StatusBoard(self._say, f"bk-sim load {sc.name}", live=self.env.live) as board:
            while True:
                elapsed = time.monotonic() - t0
                if elapsed >= seconds:
                    break
                if self._ended.is_set():
                    board.say("terminated: stopping users and writing what was measured")
                    return True
                if spec.stages and elapsed > 1.0 and runner.state == "stopped":
                    break
                board.show(*_progress(env, elapsed))
                gevent.sleep(0.2)
            board.show(*_progress(env, time.monotonic() - t0), force=True)
        return False

    def _web(self, env: Environment) -> None:
        opt = self.options
        spec = self.scenario.load
        from locust.argument_parser import get_parser

        # The web UI reads its form's defaults (and more) from a full Locust namespace.
        env.parsed_options = get_parser().parse_args(
            ["-u", str(spec.users), "-r", str(spec.spawn_rate), "-H", env.host or ""]
        )
        # Locust's UI parses sys.argv with its own parser on every page load; ours are not
        # its options (click has parsed them already).
        sys.argv = sys.argv[:1]
        web_ui = env.create_web_ui(host=opt.web_host, port=opt.web_port)
        self._say(f"Locust web UI on http://{opt.web_host}:{opt.web_port}/ (Ctrl-C ends the run)")
        # The server binds in its own greenlet: a port in use ends that greenlet, not the
        # run, which then waited forever behind a UI nobody could open.
        while not self._ended.wait(0.5):
            server = web_ui.greenlet
            if server is not None and server.dead:
                raise BkSimError(
                    f"Locust web UI on {opt.web_host}:{opt.web_port} stopped: {server.exception}"
                )

    def _stop(self, runner: Runner) -> None:
        """Graceful stop; a master then waits one worker report for the final numbers."""
        if runner.state not in ("stopped", "ready"):
            runner.stop()
        if isinstance(runner, MasterRunner):
            gevent.sleep(WORKER_REPORT_INTERVAL + 0.5)

    # ------------------------------------------------------------------ resources

    def _amqp_address(self, endpoints: BrokerEndpoints) -> tuple[str | None, int | None]:
        if not endpoints.amqp_url:
            return None, None
        host, port = endpoints.amqp_host_port()
        adv = self.options.advertise_host
        if adv and host in ("127.0.0.1", "localhost", "::1"):
            host = adv
        return host, port

    def _amqp_ssl(self, endpoints: BrokerEndpoints) -> bool:
        """TLS to the broker: an ``amqps://`` URL, or a remote platform's default (5671)."""
        if endpoints.amqp_url:
            return endpoints.amqp_url.startswith("amqps:")
        return self.scenario.platform.mode == "remote"

    # ------------------------------------------------------------------ worker

    def _worker(self) -> LoadResult:
        opt = self.options
        sc = self.scenario
        work = Path(tempfile.mkdtemp(prefix="bk-sim-load-worker-"))
        try:
            ctx = LoadContext(sc, work / "downloads")
            ctx.payloads = build_payloads(sc, work / "payloads")
            env = Environment(user_classes=[user_class(ctx)], stop_timeout=STOP_GRACE_S)
            try:
                runner = env.create_worker_runner(opt.master_host, opt.master_port)
            except ConnectionError as exc:  # Locust gives up after its retries (5 min)
                raise BkSimError(
                    f"Locust worker: no master answered on {opt.master_host}:{opt.master_port}"
                ) from exc

            def setup(environment: Environment, msg: Any, **_: Any) -> None:
                d = msg.data
                ctx.configure(
                    api_url=d["api_url"],
                    credentials=d["credentials"],
                    transport=d["transport"],
                    amqp_host=d["amqp_host"],
                    amqp_port=d["amqp_port"],
                    amqp_ssl=d["amqp_ssl"],
                )
                self._say(f"worker: {len(d['credentials'])} leaves on {d['api_url']}")

            def report(client_id: str, data: dict[str, Any]) -> None:
                data["bk_sim"] = ctx.counters.take()

            runner.register_message(_SETUP, setup)
            env.events.report_to_master.add_listener(report)

            def say_hello() -> None:
                while not ctx.ready.is_set():
                    runner.send_message(_HELLO, {"pid": os.getpid()})
                    gevent.sleep(1.0)

            hello = gevent.spawn(say_hello)
            self._say(f"worker: connecting to master {opt.master_host}:{opt.master_port}")
            try:
                runner.greenlet.join()
            except KeyboardInterrupt:
                runner.quit()
            hello.kill(block=False)
            ctx.close_all()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return LoadResult(0, None, {})


# ---------------------------------------------------------------------- judging


def _http_total(env: Environment) -> StatsEntry:
    stats = env.runner.stats if env.runner is not None else env.stats
    total = StatsEntry(stats, "HTTP", "", use_response_times_cache=False)
    for entry in stats.entries.values():
        if entry.method in HTTP_TYPES:
            total.extend(entry)
    return total


def _row(e: StatsEntry) -> dict[str, Any]:
    return {
        "type": e.method,
        "name": e.name,
        "requests": e.num_requests,
        "failures": e.num_failures,
        "median_ms": e.median_response_time if e.num_requests else None,
        "p95_ms": e.get_response_time_percentile(0.95) if e.num_requests else None,
        "avg_ms": e.avg_response_time if e.num_requests else None,
        "max_ms": e.max_response_time if e.num_requests else None,
        "rps": e.total_rps,
        "avg_bytes": e.avg_content_length if e.num_requests else None,
    }


def summarise(env: Environment) -> dict[str, Any]:
    """Locust's numbers in results.json: per row, HTTP total, notifications, failures."""
    stats = env.runner.stats if env.runner is not None else env.stats
    rows = [_row(e) for e in sorted(stats.entries.values(), key=lambda e: (e.method, e.name))]
    total = _http_total(env)
    n = total.num_requests
    http = {
        "requests": n,
        "failures": total.num_failures,
        "error_rate": total.num_failures / n if n else None,
        "p50_ms": total.get_response_time_percentile(0.5) if n else None,
        "p95_ms": total.get_response_time_percentile(0.95) if n else None,
        "rps": total.total_rps,
    }
    notify = {r["name"]: r["requests"] for r in rows if r["type"] == NOTIFY}
    failures = [
        {"type": f.method, "name": f.name, "error": f.error, "occurrences": f.occurrences}
        for f in stats.errors.values()
    ]
    return {"http": http, "requests": rows, "notifications": notify, "failures": failures}


def judge(
    sc: Scenario,
    summary: dict[str, Any],
    platform_stats: dict[str, dict[str, int]] | None,
    *,
    reconcile: bool,
) -> list[Check]:
    """The run's checks: some load reached the platform, thresholds, reconciliation."""
    http = summary["http"]
    checks = [
        Check(
            "load: HTTP requests made",
            http["requests"] > 0,
            f"{http['requests']} HTTP attempts",
        )
    ]
    spec = sc.load
    if spec.p95_ms is not None:
        p95 = http["p95_ms"]
        checks.append(
            Check(
                "threshold: p95_ms",
                p95 is not None and p95 <= spec.p95_ms,
                f"p95 {_fmt(p95)} ms, limit {spec.p95_ms:g} ms",
            )
        )
    if spec.error_rate is not None:
        rate = http["error_rate"]
        checks.append(
            Check(
                "threshold: error_rate",
                rate is not None and rate <= spec.error_rate,
                f"{http['failures']} of {http['requests']} HTTP attempts failed "
                f"({_fmt(rate, pct=True)}), limit {spec.error_rate:.2%}",
            )
        )
    if reconcile and platform_stats is not None:
        checks.append(_reconcile(summary["requests"], platform_stats))
    return checks


def _reconcile(rows: list[dict[str, Any]], platform_stats: dict[str, dict[str, int]]) -> Check:
    ours: dict[str, int] = {}
    for r in rows:
        if r["type"] in HTTP_TYPES:
            ours[r["name"]] = ours.get(r["name"], 0) + r["requests"]
    # WebSocket upgrades are the transport's connects (Locust's WEBSOCKET rows), not
    # HTTP attempts of the client.
    theirs = {name: sum(counts.values()) for name, counts in platform_stats.items() if name != "ws"}
    diffs = {
        name: (ours.get(name, 0), theirs.get(name, 0))
        for name in sorted(set(ours) | set(theirs))
        if ours.get(name, 0) != theirs.get(name, 0)
    }
    total = sum(ours.values())
    if not diffs:
        return Check(
            "reconciliation: Locust counted every attempt the platform answered",
            True,
            f"{total} HTTP attempts on both sides",
        )
    text = ", ".join(f"{n}: Locust {a}, platform {b}" for n, (a, b) in diffs.items())
    return Check("reconciliation: Locust counted every attempt the platform answered", False, text)


def _fmt(value: float | None, *, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2%}" if pct else f"{value:,.0f}"


def _progress(env: Environment, elapsed: float) -> tuple[str, dict[str, str]]:
    """The load's status: a plain line, and the live display's fields."""
    total = _http_total(env)
    runner = env.runner
    users = runner.user_count if runner is not None else 0
    p95 = total.get_response_time_percentile(0.95) if total.num_requests else None
    stats = runner.stats if runner is not None else env.stats
    notes = sum(e.num_requests for e in stats.entries.values() if e.method == NOTIFY)
    line = (
        f"[{elapsed:6.1f}s] users {users}  HTTP {total.num_requests} "
        f"({total.current_rps:.0f}/s)  failed {total.num_failures}  p95 {_fmt(p95)} ms  "
        f"notifications {notes}"
    )
    fields = {
        "elapsed s": f"{elapsed:.1f}",
        "users": str(users),
        "HTTP": str(total.num_requests),
        "per s": f"{total.current_rps:.0f}",
        "failed": str(total.num_failures),
        "p95 ms": _fmt(p95),
        "notifications": str(notes),
    }
    return line, fields
