"""``RunEnvironment``: the one object a workload runs on (in the spirit of Locust's).

It gets the broker, starts (or reaches) the platform and provisions the leaves'
credentials, plays a ``LeafHost``'s event stream into the run's one log while showing
progress, and writes the verdict: ``results.json`` (strict, atomic) and the reports.
``bk-sim run``, ``chaos`` and ``load`` are thin workloads on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bk_sim.broker import BrokerEndpoints, NodeTLS, provide_broker
from bk_sim.client import Client, Credentials, RetryConfig
from bk_sim.engine._checks import Check
from bk_sim.engine._eventlog import EventLog, harness_event
from bk_sim.engine._host import LeafHost, RunHooks
from bk_sim.engine._limits import platform_limits
from bk_sim.engine._progress import RunCounters, Say, StatusBoard
from bk_sim.engine._records import RoundRecord
from bk_sim.engine._results import RunResult, RunTimes, results_document, write_json
from bk_sim.errors import BkSimError, ClientError, PlatformError, ScenarioError
from bk_sim.files import SECRET_MODE, atomic_write
from bk_sim.scenario import Scenario
from bk_sim.tls import RunCertificates, make_run_certificates

if TYPE_CHECKING:  # the platform (aiohttp) is imported only by a run that starts one
    from bk_sim.platform import AdminClient, PlatformHandle

_log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 2.0
_DRAIN_BATCH = 2000
_PROBE_TIMEOUT_S = 15.0
#: Sockets beyond one per leaf: the platform's own connections and the harness's.
SOCKET_MARGIN = 50


def broker_needs(scenario: Scenario, *, chaos: bool) -> dict[str, Any]:
    """What the run asks of its broker (``provide_broker`` keywords): ``auto`` starts a node
    of bk-sim's own for restarts and for more connections than the shared broker holds."""
    restarts = chaos and any(f.kind == "restart_broker" for f in scenario.chaos.faults)
    amqp = scenario.transport == "amqp"
    return {
        "needs_restart": restarts,
        "needed_connections": scenario.leaves.count + SOCKET_MARGIN if amqp else 0,
    }


@dataclass(frozen=True)
class PlatformNeeds:
    """What a workload needs of the platform: leaves and how rounds close."""

    leaves: int
    tree_name: str
    quorum: int | None
    round_timeout_s: float | None
    #: why ``leaves`` credentials are needed, for the error when a file holds fewer
    purpose: str = ""
    #: local platform: listen address; workers elsewhere reach it at ``advertise_host``
    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None
    #: write the local leaves' credentials to leaves.json (owner-readable only)
    write_credentials: bool = True
    #: remote platform: ask it once as the first leaf before any leaf starts
    probe_remote: bool = True
    #: federated analytics: the branch's ``field_ops`` (custom fields' operations)
    field_ops: Mapping[str, str] | None = None


@dataclass
class PlatformAccess:
    """The platform a run plays against, as the workload sees it."""

    api_url: str
    credentials: list[dict[str, str]]
    admin: AdminClient | None = None
    branch_id: str | None = None
    base_faults: dict[str, Any] = field(default_factory=dict)
    #: a local platform's process (chaos ``kill_platform`` restarts it: its ``admin`` is
    #: then a new client, so the records are read through it)
    handle: PlatformHandle | None = None

    def rounds(self) -> list[RoundRecord] | None:
        """The platform's round records, or None when it has no admin API for us."""
        admin = self.handle.admin if self.handle is not None else self.admin
        if admin is None or self.branch_id is None:
            return None
        return [RoundRecord.from_dict(r) for r in admin.rounds(self.branch_id)]


#: Leaves provisioned per admin call.
_LEAVES_PER_CALL = 500


class RunEnvironment:
    """One run's resources and its results; build it, then enter its pieces in order."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        kind: str = "",
        run_dir: Path | None = None,
        progress: Say | None = None,
        may_enable_plugin: bool = False,
        live: bool | None = None,
    ) -> None:
        self.scenario = scenario
        #: a live status table (rich); None: when stderr is a terminal
        self.live = live
        self.say: Say = progress or (lambda line: _log.info("%s", line))
        self._may_enable_plugin = may_enable_plugin
        self._run_dir_given = run_dir is not None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        suffix = f"-{kind}" if kind else ""
        self.run_dir = run_dir or Path(scenario.report.dir) / f"{scenario.name}{suffix}-{stamp}"
        self.started = time.time()
        self.endpoints: BrokerEndpoints | None = None
        self.platform: PlatformAccess | None = None
        #: platform.tls (local): the run's CA and certificates, made before the broker starts
        self.tls: RunCertificates | None = None

    # ------------------------------------------------------------------ the run folder

    def make_run_dir(self, *subdirs: str) -> Path:
        """Create the run folder: a one-line error when report.dir is unusable, and a
        suffix when another run of the scenario started in the same second."""
        base = self.run_dir
        for n in range(2, 100):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=False)
                for sub in subdirs:
                    (self.run_dir / sub).mkdir()
                self.started = time.time()
                return self.run_dir
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

    # ------------------------------------------------------------------ broker

    def broker(
        self, stack: contextlib.ExitStack, *, provide_for_remote: bool = True, chaos: bool = False
    ) -> BrokerEndpoints:
        """The run's broker, released when ``stack`` closes. A remote platform has its
        own broker: with ``provide_for_remote`` False it is only described. ``chaos``: the
        run plays the scenario's faults (a ``restart_broker`` needs a node of our own)."""
        sc = self.scenario
        b = sc.broker
        if sc.platform.tls and sc.platform.mode == "local" and self.tls is None:
            self.tls = make_run_certificates(self.run_dir / "tls")
            self.say(f"TLS: a CA and certificates for this run in {self.run_dir / 'tls'}")
        if sc.platform.mode == "remote" and not provide_for_remote:
            endpoints = BrokerEndpoints(
                provider="external",
                amqp_url=b.amqp_url,
                management_url=b.management_url,
                reason="remote platform",
            )
        else:
            provider = b.provider
            if sc.transport == "websocket" and provider == "auto" and not b.amqp_url:
                provider = "none"
            endpoints = stack.enter_context(
                provide_broker(
                    provider,
                    amqp_url=b.amqp_url,
                    management_url=b.management_url,
                    may_enable_plugin=self._may_enable_plugin,
                    on_status=self.say,
                    **broker_needs(sc, chaos=chaos),
                    tls=None
                    if self.tls is None or provider == "none"  # WebSocket: no broker at all
                    else NodeTLS(self.tls.ca, self.tls.cert, self.tls.key),
                )
            )
            self.say(f"broker: {endpoints.reason}")
        self.endpoints = endpoints
        return endpoints

    def leaf_amqp(self, endpoints: BrokerEndpoints) -> tuple[str | None, int | None]:
        """Where leaves reach the broker: its AMQPS listener in a TLS run."""
        if self.tls is not None and endpoints.amqps_url:
            parts = urlsplit(endpoints.amqps_url)
            return parts.hostname or "127.0.0.1", parts.port or 5671
        return endpoints.amqp_host_port() if endpoints.amqp_url else (None, None)

    def transport(self, endpoints: BrokerEndpoints, who: str = "leaves") -> str:
        """The scenario's transport, or WebSocket when there is no broker."""
        if endpoints.provider == "none" and self.scenario.transport == "amqp":
            self.say(f"no broker: {who} use the WebSocket transport")
            return "websocket"
        return self.scenario.transport

    # ------------------------------------------------------------------ platform

    @contextlib.contextmanager
    def platform_for(
        self, endpoints: BrokerEndpoints, needs: PlatformNeeds, log: EventLog | None = None
    ) -> Iterator[PlatformAccess]:
        """A local platform with a fresh branch and ``needs.leaves`` leaves (stopped on
        exit), or the remote one with the credentials from its file."""
        p = self.scenario.platform
        if p.mode == "remote":
            if log is not None:
                log.add_secrets((p.admin_token or "",))
            access = self._remote(needs)
        else:
            token = secrets.token_urlsafe(24)
            if log is not None:
                log.add_secrets((token,))
            with self._local(endpoints, needs, token) as access:
                self.platform = access
                if log is not None:
                    log.add_secrets(tuple(c["session_token"] for c in access.credentials))
                yield access
            return
        self.platform = access
        if log is not None:
            log.add_secrets(tuple(c["session_token"] for c in access.credentials))
        yield access

    @contextlib.contextmanager
    def _local(
        self, endpoints: BrokerEndpoints, needs: PlatformNeeds, token: str
    ) -> Iterator[PlatformAccess]:
        sc = self.scenario
        p = sc.platform
        from bk_sim.platform import start_platform

        self.say("starting the reference platform")
        # Upload and decoded-archive limits follow from the model (issue 17).
        lim = platform_limits(sc)
        tls = self.tls
        if endpoints.amqp_url and endpoints.management_url:
            handle = start_platform(
                self.run_dir / "platform",
                admin_token=token,
                host=needs.bind_host,
                amqp_url=endpoints.amqp_url,
                management_url=endpoints.management_url,
                max_upload_bytes=lim.max_upload_bytes,
                max_decompressed_bytes=lim.max_decompressed_bytes,
                tls_cert=tls.cert if tls else None,
                tls_key=tls.key if tls else None,
                tls_ca=tls.ca if tls else None,
            )
        else:
            handle = start_platform(
                self.run_dir / "platform",
                admin_token=token,
                host=needs.bind_host,
                no_amqp=True,
                max_upload_bytes=lim.max_upload_bytes,
                max_decompressed_bytes=lim.max_decompressed_bytes,
                tls_cert=tls.cert if tls else None,
                tls_key=tls.key if tls else None,
                tls_ca=tls.ca if tls else None,
            )
        try:
            url = handle.url
            adv = needs.advertise_host
            if needs.bind_host == "0.0.0.0" and adv:
                url = url.replace("0.0.0.0", adv).replace("127.0.0.1", adv)
            admin = handle.admin
            tree_id = admin.create_tree(needs.tree_name)
            branch = admin.create_branch(
                tree_id,
                name=sc.name,
                strategy=p.strategy,
                quorum=needs.quorum,
                round_timeout_s=needs.round_timeout_s,
                trim_fraction=p.trim_fraction,
                field_ops=dict(needs.field_ops) if needs.field_ops else None,
            )
            branch_id = str(branch["branch_id"])
            # In chunks: provisioning a leaf is a RabbitMQ user, vhost permission and queue
            # on the broker's management API, and one call for 10,000 outlasts the admin
            # client's 30 s read timeout.
            creds = []
            for first in range(0, needs.leaves, _LEAVES_PER_CALL):
                count = min(_LEAVES_PER_CALL, needs.leaves - first)
                creds += admin.create_leaves(branch_id, count)
            base_faults = dataclasses.asdict(p.faults)
            admin.set_faults(branch_id, base_faults)
            admin.set_run_status(branch_id, "start")
            if needs.write_credentials:
                atomic_write(
                    self.run_dir / "leaves.json", json.dumps(creds, indent=2), mode=SECRET_MODE
                )
            self.say(f"platform at {url}: branch {branch_id}, {len(creds)} leaves")
            try:
                yield PlatformAccess(url, creds, admin, branch_id, base_faults, handle)
            finally:
                with contextlib.suppress(BkSimError):
                    # handle.admin, not admin: a chaos kill_platform replaces the client.
                    handle.admin.delete_tree(tree_id)
        finally:
            handle.stop()

    def _remote(self, needs: PlatformNeeds) -> PlatformAccess:
        """A remote platform: the leaves' credentials from its file, checked against it,
        and its admin API when the scenario gives it."""
        p = self.scenario.platform
        assert p.host is not None and p.credentials_file is not None
        try:
            raw = json.loads(Path(p.credentials_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ScenarioError(
                f"platform.credentials_file {p.credentials_file}: "
                f"cannot read leaf credentials: {exc}"
            ) from exc
        if not isinstance(raw, list) or len(raw) < needs.leaves:
            have = len(raw) if isinstance(raw, list) else 0
            raise ScenarioError(
                f"platform.credentials_file {p.credentials_file}: holds {have} leaves, "
                f"{needs.purpose or f'the run needs {needs.leaves}'}"
            )
        creds = [Credentials.from_dict(c).to_dict() for c in raw[: needs.leaves]]
        if needs.probe_remote:
            _probe_remote(p.host, creds[0])
        self.say(f"remote platform {p.host}: {len(creds)} leaves from {p.credentials_file}")
        from bk_sim.platform import AdminClient

        admin = AdminClient(p.admin_url, p.admin_token) if p.admin_url and p.admin_token else None
        return PlatformAccess(p.host, creds, admin, creds[0]["branch_id"] if admin else None)

    # ------------------------------------------------------------------ playing

    def play(
        self,
        host: LeafHost,
        log: EventLog,
        counters: RunCounters,
        *,
        hooks: RunHooks | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> bool:
        """Start ``host``'s leaves and log their events until they are done, the run's
        deadline passes or Ctrl-C; then stop them. True when interrupted."""
        sc = self.scenario
        outer_say = self.say
        with StatusBoard(outer_say, f"bk-sim {sc.name}", live=self.live) as board:
            self.say = board.say  # while live, status lines print above the table
            try:
                return self._play(host, log, counters, board, hooks, on_started)
            finally:
                self.say = outer_say

    def _play(
        self,
        host: LeafHost,
        log: EventLog,
        counters: RunCounters,
        board: StatusBoard,
        hooks: RunHooks | None,
        on_started: Callable[[], None] | None,
    ) -> bool:
        sc = self.scenario
        t0 = time.time()
        deadline = time.monotonic() + sc.timeouts.run_s
        last_flush = 0.0
        interrupted = False

        def show(force: bool = False) -> None:
            n, rounds = sc.leaves.count, sc.rounds
            line = counters.line(n, rounds, time.time() - t0)
            board.show(line, counters.fields(n, rounds), force=force)

        def take(e: dict[str, Any]) -> None:
            log.write(e)
            counters.count(e)
            if hooks is not None:
                hooks.on_event(e)

        try:
            host.start()
            if on_started is not None:
                on_started()
            while True:
                e = host.next_event(0.25)
                # Drain what is already there without waiting, but a bounded batch: a
                # stream that never pauses must not starve the deadline and progress checks.
                n = 0
                while e is not None and n < _DRAIN_BATCH:
                    take(e)
                    n += 1
                    e = host.next_event(0.0)
                if e is not None:
                    take(e)
                show()
                now = time.monotonic()
                if now - last_flush >= _PROGRESS_EVERY_S:
                    last_flush = now
                    log.flush()
                if not host.running():
                    break
                if now > deadline:
                    self.say(f"run deadline of {sc.timeouts.run_s:g} s passed: stopping leaves")
                    log.write(harness_event("run_deadline", run_s=sc.timeouts.run_s))
                    host.signal_stop()
                    break
        except KeyboardInterrupt:
            self.say("interrupted: stopping leaves and writing what was measured")
            interrupted = True
        finally:
            # Also on an error (a hook, the log): leaves must not play on unwatched.
            host.signal_stop()
            try:
                if hooks is not None:
                    hooks.end()  # faults undone, and their last events drained below
            finally:
                host.stop(lambda ev: _log_and_count(log, counters, ev))
        show(force=True)
        return interrupted

    # ------------------------------------------------------------------ results

    def finish(
        self,
        checks: list[Check],
        sections: Mapping[str, Any],
        *,
        interrupted: bool,
        run: Mapping[str, Any] | None = None,
        render: bool = True,
    ) -> RunResult:
        """The verdict: results.json (strict, atomic, redacted), then junit.xml and
        report.html; a report failure never changes the verdict."""
        if interrupted:
            checks = [*checks, Check("run: completed", False, "interrupted (Ctrl-C)")]
        times = RunTimes(self.started, time.time(), interrupted)
        result = RunResult(self.run_dir, tuple(checks), interrupted)
        doc = results_document(
            result,
            self.scenario.to_dict(),
            {"dir": str(self.run_dir), **times.to_dict(), **(run or {})},
            sections,
        )
        write_json(self.run_dir / "results.json", doc)
        if render:
            try:
                from bk_sim.report import render_run

                render_run(self.run_dir)
            except Exception:  # noqa: BLE001
                _log.exception("could not render the report of %s", self.run_dir)
        return dataclasses.replace(result, results=doc)


def _log_and_count(log: EventLog, counters: RunCounters, event: dict[str, Any]) -> None:
    log.write(event)
    counters.count(event)


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
