"""Where a run's RabbitMQ comes from, decided once at the start of the run.

``provide_broker(provider)`` yields ``BrokerEndpoints`` and tears down what it started:

- ``external``: the AMQP and management URLs given (or in ``BK_SIM_AMQP_URL`` /
  ``BK_SIM_MANAGEMENT_URL``), both checked before the run; an error says which failed.
- ``local``: RabbitMQ on 127.0.0.1:5672 with its management API on 15672 (optionally
  enabling the management plugin).
- ``testcontainers``: a throwaway ``rabbitmq:3-management`` container (Docker needed);
  the only provider bk-sim can restart itself (``restart_broker``).
- ``process``: a RabbitMQ node of bk-sim's own, started from the local installation on
  free ports with a private data dir (``_process.py``); restartable; removed at the end.
- ``none``: no broker; the run uses the WebSocket transport.
- ``auto``: the first of external (configured), process (the run restarts its broker or
  needs more connections than the shared local broker holds), local (port open),
  testcontainers (Docker answers), none; ``reason`` says which and why in one line.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import pika
import pika.exceptions
import requests
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)

from bk_sim.broker import _process, _testcontainer
from bk_sim.broker._management import ManagementAPI
from bk_sim.errors import BrokerError
from bk_sim.redact import redact_url

logger = logging.getLogger(__name__)

PROVIDERS = ("auto", "external", "local", "process", "testcontainers", "none")
ENV_AMQP_URL = "BK_SIM_AMQP_URL"
ENV_MANAGEMENT_URL = "BK_SIM_MANAGEMENT_URL"

# The local service; module constants so tests can point the probes at closed ports.
LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"
DEFAULT_MANAGEMENT_PORT = 15672
DEFAULT_AMQP_PORT = 5672

PROBE_TIMEOUT_S = 3.0
ENABLE_PLUGIN_COMMAND: tuple[str, ...] = ("rabbitmq-plugins", "enable", "rabbitmq_management")
ENABLE_PLUGIN_TIMEOUT_S = 120.0
PLUGIN_WAIT_S = 30.0
PLUGIN_POLL_S = 1.0

# Headroom over a run's own connections: the platform, management and chaos also connect.
SOCKET_MARGIN_MIN = 50
SOCKET_MARGIN_FRACTION = 0.1

Status = Callable[[str], None]


# -- the result -------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerEndpoints:
    """The run's broker: where to connect and why this one was chosen."""

    provider: str
    amqp_url: str | None
    management_url: str | None
    reason: str
    restartable: bool = False
    # The running container behind a testcontainers broker (``restart_broker`` uses it).
    _container: _testcontainer.RabbitContainer | None = field(
        default=None, compare=False, repr=False
    )
    #: AMQPS listener of a ``process`` node started with TLS (None otherwise).
    amqps_url: str | None = None
    # The node behind a process broker (``restart_broker`` uses it).
    _node: _process.ProcessNode | None = field(default=None, compare=False, repr=False)

    def amqp_host_port(self) -> tuple[str, int]:
        """``(host, port)`` of the AMQP listener, e.g. for a chaos TCP proxy in front of it."""
        if self.amqp_url is None:
            raise BrokerError(
                f"broker provider {self.provider!r} has no AMQP endpoint "
                "(the run uses the WebSocket transport)"
            )
        parts = urlsplit(self.amqp_url)
        default = 5671 if parts.scheme == "amqps" else DEFAULT_AMQP_PORT
        return parts.hostname or "127.0.0.1", parts.port or default


# -- the public entry points ------------------------------------------------------------


@contextmanager
def provide_broker(
    provider: str = "auto",
    *,
    amqp_url: str | None = None,
    management_url: str | None = None,
    may_enable_plugin: bool = False,
    on_status: Status | None = None,
    needs_restart: bool = False,
    needed_connections: int = 0,
    tls: _process.NodeTLS | None = None,
) -> Iterator[BrokerEndpoints]:
    """Yield the run's broker; tear down what it started (testcontainers, process) whatever
    happens, Ctrl-C included.

    ``needs_restart`` / ``needed_connections`` steer ``auto`` towards a node of bk-sim's own;
    ``tls`` gives that node an AMQPS listener (``endpoints.amqps_url``).
    """
    if provider not in PROVIDERS:
        raise BrokerError(
            f"unknown broker provider {provider!r}: choose one of {', '.join(PROVIDERS)}"
        )
    if provider in ("local", "process", "testcontainers", "none") and (amqp_url or management_url):
        raise BrokerError(
            f"broker provider {provider!r} does not take URLs; "
            "use provider 'external' (or 'auto') with --amqp-url / --management-url"
        )
    if tls is not None and provider not in ("auto", "process"):
        raise BrokerError(
            f"TLS needs bk-sim's own broker node (provider 'process' or 'auto'), not {provider!r}"
        )
    if tls is not None:
        needs_restart = True  # only a node of bk-sim's own gets the run's certificates
    need = _Need(needs_restart, needed_connections, tls)
    endpoints = _choose(provider, amqp_url, management_url, may_enable_plugin, on_status, need)
    logger.info("broker: %s", endpoints.reason)  # the caller shows ``reason`` itself
    try:
        yield endpoints
    finally:
        # A status callback that fails (a closed pipe) must not skip the teardown.
        if endpoints._container is not None:
            try:
                _say(on_status, "testcontainers: removing the broker container")
            finally:
                endpoints._container.stop()
        if endpoints._node is not None:
            try:
                _say(on_status, f"process: stopping and removing node {endpoints._node.nodename}")
            finally:
                endpoints._node.remove()


def restart_broker(
    endpoints: BrokerEndpoints,
    *,
    timeout: float = _testcontainer.READY_TIMEOUT_S,
    on_status: Status | None = None,
) -> BrokerEndpoints:
    """Restart a process node (stopped and started, data kept) or a testcontainers broker
    (``docker restart``, volume kept); wait until it answers.

    Returns the endpoints to use afterwards: the same URLs when Docker runs on this machine
    (ports are fixed at start), re-read ones with a remote Docker host.
    """
    if endpoints._node is not None:
        endpoints._node.restart(
            _ready, timeout=max(timeout, _process.START_TIMEOUT_S), on_status=on_status
        )
        return endpoints
    container = endpoints._container
    if container is None:
        raise BrokerError(
            f"bk-sim cannot restart the {endpoints.provider!r} broker: only a process or "
            "testcontainers broker is restarted by bk-sim (restart a local one with "
            "rabbitmqctl stop_app; rabbitmqctl start_app)"
        )
    container.restart(timeout=timeout, on_status=on_status)
    return replace(endpoints, amqp_url=container.amqp_url, management_url=container.management_url)


def check_socket_capacity(endpoints: BrokerEndpoints, needed_connections: int) -> None:
    """Raise BrokerError before a run when the broker cannot hold its connections.

    Reads ``sockets_total`` (or ``fd_total`` on brokers that no longer report sockets) from
    GET /api/nodes and compares it with the run's connections plus a margin. In a cluster
    each running node must hold them all: clients may all land on one node.
    """
    if endpoints.management_url is None or needed_connections <= 0:
        return
    limit = endpoints._node.open_files_limit() if endpoints._node is not None else None
    if limit is not None:  # bk-sim's own node: its VM's limit, before the API reports one
        problem = capacity_problem(
            [{"name": endpoints._node.nodename if endpoints._node else "?", "fd_total": limit}],
            needed_connections,
            provider=endpoints.provider,
        )
        if problem:
            raise BrokerError(problem)
        return
    api = ManagementAPI(endpoints.management_url, timeout=max(PROBE_TIMEOUT_S, 5.0))
    try:
        nodes = api.nodes()
    except BrokerError as exc:
        raise BrokerError(
            f"socket capacity check could not read the broker's limits: {exc} (GET /api/nodes "
            "needs a management user with the 'monitoring' or 'administrator' tag)"
        ) from exc
    finally:
        api.close()
    problem = capacity_problem(nodes, needed_connections, provider=endpoints.provider)
    if problem:
        raise BrokerError(problem)


def capacity_problem(
    nodes: list[dict[str, Any]], needed_connections: int, *, provider: str = "local"
) -> str | None:
    """The one-line complaint about the first node too small for the run, or None."""
    margin = max(SOCKET_MARGIN_MIN, int(needed_connections * SOCKET_MARGIN_FRACTION))
    needed = needed_connections + margin
    for node in nodes:
        if node.get("running") is False:
            continue
        if isinstance(node.get("sockets_total"), int) and node["sockets_total"] > 0:
            limit, used, what = node["sockets_total"], node.get("sockets_used"), "sockets_total"
        elif isinstance(node.get("fd_total"), int) and node["fd_total"] > 0:
            limit, used, what = node["fd_total"], node.get("fd_used"), "fd_total"
        else:
            logger.warning("node %s reports no socket or fd limit", node.get("name"))
            continue
        if limit >= needed:
            continue
        in_use = f", {used} in use" if isinstance(used, int) else ""
        return (
            f"RabbitMQ node {node.get('name', '?')} allows {limit} sockets ({what}{in_use}) but "
            f"this run needs {needed_connections} connections + {margin} margin = {needed}: "
            f"{_ulimit_advice(needed, provider)}"
        )
    return None


def _ulimit_advice(needed: int, provider: str) -> str:
    # RabbitMQ gives sockets about 80-90% of its file descriptors; leave room for that.
    target = max(20000, -(-int(needed * 1.25) // 1000) * 1000)
    if provider == "testcontainers":
        return (
            f"start the container with a higher open-file limit (docker run --ulimit "
            f"nofile={target}:{target}; compose: ulimits: nofile: {target})"
        )
    return (
        "raise the broker's open-file limit where it is started (it runs as its own user, so "
        f"a ulimit in your shell does not reach it), e.g. `rabbitmqctl stop; su rabbitmq -s "
        f'/bin/sh -c "ulimit -n {target}; rabbitmq-server -detached"` (systemd: '
        f"LimitNOFILE={target}; Docker: --ulimit nofile={target}:{target})"
    )


# -- choosing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Need:
    """What the run asks of its broker beyond AMQP: restarts, many connections, TLS."""

    restart: bool = False
    connections: int = 0
    tls: _process.NodeTLS | None = None


def _choose(
    provider: str,
    amqp_url: str | None,
    management_url: str | None,
    may_enable_plugin: bool,
    on_status: Status | None,
    need: _Need | None = None,
) -> BrokerEndpoints:
    need = need or _Need()
    if provider == "none":
        return BrokerEndpoints(
            "none", None, None, "none: asked for no broker; the run uses the WebSocket transport"
        )
    if provider == "process":
        return _process_node(need, on_status, why="asked for")
    if provider in ("external", "auto"):
        amqp_url, management_url, source = _configured(amqp_url, management_url)
        if amqp_url or management_url:
            if need.tls is not None:
                raise BrokerError(
                    "TLS needs bk-sim's own broker node, but an external broker is configured "
                    f"({ENV_AMQP_URL} / --amqp-url): unset it or use provider 'process'"
                )
            return _external(amqp_url, management_url, source)
        if provider == "external":
            raise BrokerError(
                "broker provider 'external' needs an AMQP URL and management URL: pass "
                f"--amqp-url / --management-url or set {ENV_AMQP_URL} / {ENV_MANAGEMENT_URL}"
            )
    if provider == "local":
        return _local(may_enable_plugin, on_status, why="")
    if provider == "testcontainers":
        ok, docker_why = _testcontainer.docker_available()
        if not ok:
            raise BrokerError(
                f"broker provider 'testcontainers' needs Docker, but no Docker daemon answered: "
                f"{docker_why} (start Docker, set DOCKER_HOST, or choose another provider)"
            )
        return _testcontainers(on_status, why="asked for")

    # auto, with nothing configured
    host, port = _host_port(LOCAL_AMQP_URL)
    local_open = _port_open(host, port)
    own_why = _own_node_reason(need, local_open, host, port)
    if own_why is not None:
        ok, process_why = _process.process_available()
        if ok:
            return _process_node(need, on_status, why=f"auto: {own_why}")
        if need.restart or need.tls is not None:
            ok, docker_why = _testcontainer.docker_available()
            if ok and need.tls is None:
                return _testcontainers(on_status, why=f"{own_why}, {process_why}, and {docker_why}")
            raise BrokerError(
                f"auto: {own_why}, but bk-sim cannot start a broker of its own here: {process_why}"
                + ("" if need.tls is not None else f"; and no Docker ({docker_why})")
            )
        logger.warning("auto: %s, but %s: using the shared broker", own_why, process_why)
    if local_open:
        return _local(may_enable_plugin, on_status, why=f" (auto: {ENV_AMQP_URL} unset)")
    ok, docker_why = _testcontainer.docker_available()
    if ok:
        return _testcontainers(
            on_status, why=f"no broker configured or listening on {host}:{port}, and {docker_why}"
        )
    process_ok, _ = _process.process_available()
    hint = " (--broker process would start bk-sim's own RabbitMQ node)" if process_ok else ""
    return BrokerEndpoints(
        "none",
        None,
        None,
        f"none: no broker configured ({ENV_AMQP_URL} unset), nothing listening on {host}:{port} "
        f"and no Docker daemon answered ({docker_why}){hint}; the run uses the WebSocket "
        "transport",
    )


def _own_node_reason(need: _Need, local_open: bool, host: str, port: int) -> str | None:
    """Why ``auto`` should start a node of bk-sim's own instead of the shared one, or None."""
    if need.tls is not None:
        return "the run uses TLS (AMQPS with this run's certificates)"
    if need.restart:
        return (
            "the run restarts its broker (chaos restart_broker), which must never hit the "
            f"shared broker on {host}:{port}"
        )
    if need.connections > 0 and local_open:
        try:
            api = ManagementAPI(LOCAL_MANAGEMENT_URL, timeout=PROBE_TIMEOUT_S)
            try:
                nodes = api.nodes()
            finally:
                api.close()
        except BrokerError:
            return None  # the run's own capacity check will say what is wrong
        problem = capacity_problem(nodes, need.connections)
        if problem is not None:
            return (
                f"the run needs {need.connections} connections, more than the shared broker on "
                f"{host}:{port} holds ({problem.split(':', 1)[0]})"
            )
    return None


def _ready(amqp_url: str, management_url: str) -> None:
    _check_amqp(amqp_url)
    _check_management(management_url)


def _process_node(need: _Need, on_status: Status | None, *, why: str) -> BrokerEndpoints:
    """Start bk-sim's own node (sweeping ones left by dead runs first)."""
    ok, detail = _process.process_available()
    if not ok:
        raise BrokerError(f"process: cannot start a RabbitMQ node of bk-sim's own: {detail}")
    _process.sweep_orphans()
    server, _ = _process.find_server()
    assert server is not None
    node = _process.ProcessNode(server, tls=need.tls)
    where = f"127.0.0.1:{node.amqp_port}" + (
        f", AMQPS on {node.amqps_port}" if need.tls is not None else ""
    )
    _say(
        on_status,
        f"process: {why}, so bk-sim starts a RabbitMQ node of its own: {node.nodename} on "
        f"{where} (management API on {node.management_port}, data in {node.dir})",
    )
    try:
        took = node.start(_ready, on_status=on_status)
        if need.tls is not None:
            _check_tls(node.amqps_port, need.tls.cacertfile)
    except BaseException:
        node.remove()
        raise
    limit = node.open_files_limit()
    return BrokerEndpoints(
        "process",
        node.amqp_url,
        node.management_url,
        f"process: {why}; own node {node.nodename} on {where}, management API on "
        f"{node.management_port}, ready in {took:.1f} s"
        + (f", open-file limit {limit}" if limit else ""),
        restartable=True,
        amqps_url=node.amqps_url,
        _node=node,
    )


def _check_tls(port: int, cafile: Path) -> None:
    """A TLS handshake with the node's AMQPS listener, verified against the run's CA."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"process: the node's AMQPS listener on {port} failed: {exc}") from exc


def _configured(
    amqp_url: str | None, management_url: str | None
) -> tuple[str | None, str | None, str]:
    """The external URLs from arguments, else the environment, deriving a missing one."""
    source = "given"
    if not (amqp_url or management_url):
        amqp_url = os.environ.get(ENV_AMQP_URL) or None
        management_url = os.environ.get(ENV_MANAGEMENT_URL) or None
        source = "from the environment"
    if amqp_url and not management_url:
        management_url = _derive(amqp_url, "http", DEFAULT_MANAGEMENT_PORT)
        source += ", management URL derived from the AMQP URL"
    elif management_url and not amqp_url:
        amqp_url = _derive(management_url, "amqp", DEFAULT_AMQP_PORT)
        source += ", AMQP URL derived from the management URL"
    return amqp_url, management_url, source


def _derive(url: str, scheme: str, port: int) -> str:
    """Same user, password and host as ``url`` on another scheme and port."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    userinfo = ""
    if parts.username is not None:
        userinfo = (
            parts.username + (f":{parts.password}" if parts.password is not None else "") + "@"
        )
    return urlunsplit((scheme, f"{userinfo}{host}:{port}", "/", "", ""))


def _external(amqp_url: str | None, management_url: str | None, source: str) -> BrokerEndpoints:
    assert amqp_url and management_url
    failures: list[str] = []
    for check, url, flag in (
        (_check_amqp, amqp_url, f"--amqp-url / {ENV_AMQP_URL}"),
        (_check_management, management_url, f"--management-url / {ENV_MANAGEMENT_URL}"),
    ):
        try:
            check(url)
        except BrokerError as exc:
            failures.append(f"{exc} [set by {flag}]")
    if failures:
        raise BrokerError("external broker: " + "; ".join(failures))
    return BrokerEndpoints(
        "external",
        amqp_url,
        management_url,
        f"external: AMQP {redact_url(amqp_url)} and management API {redact_url(management_url)} "
        f"both answered ({source})",
    )


def _local(may_enable_plugin: bool, on_status: Status | None, *, why: str) -> BrokerEndpoints:
    host, port = _host_port(LOCAL_AMQP_URL)
    mhost, mport = _host_port(LOCAL_MANAGEMENT_URL)
    if not _port_open(host, port):
        raise BrokerError(
            f"local: nothing is listening on {host}:{port}: start RabbitMQ "
            "(rabbitmq-server -detached) or choose another broker provider"
        )
    _check_amqp(LOCAL_AMQP_URL)
    try:
        _check_management(LOCAL_MANAGEMENT_URL)
        enabled = ""
    except _ProbeError as exc:
        if exc.kind != "refused":
            raise
        command = " ".join(ENABLE_PLUGIN_COMMAND)
        if not may_enable_plugin:
            raise BrokerError(
                f"local: RabbitMQ answered on {host}:{port} but its management API did not on "
                f"{mhost}:{mport}: run `{command}` (or let bk-sim do it: --enable-plugin)"
            ) from exc
        _enable_plugin(on_status)
        enabled = " (management plugin enabled by bk-sim)"
    return BrokerEndpoints(
        "local",
        LOCAL_AMQP_URL,
        LOCAL_MANAGEMENT_URL,
        f"local: RabbitMQ answered on {host}:{port} and its management API on {mport}"
        f"{enabled}{why}",
    )


def _enable_plugin(on_status: Status | None) -> None:
    command = " ".join(ENABLE_PLUGIN_COMMAND)
    mhost, mport = _host_port(LOCAL_MANAGEMENT_URL)
    _say(on_status, f"local: management API not answering on {mhost}:{mport}; running `{command}`")
    try:
        proc = subprocess.run(
            list(ENABLE_PLUGIN_COMMAND),
            capture_output=True,
            text=True,
            timeout=ENABLE_PLUGIN_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise BrokerError(
            f"local: `{command}` failed: {ENABLE_PLUGIN_COMMAND[0]} is not on PATH"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(
            f"local: `{command}` did not finish in {ENABLE_PLUGIN_TIMEOUT_S:.0f}s"
        ) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BrokerError(
            f"local: `{command}` failed (exit {proc.returncode}): {tail[0][:200]} "
            "(run it yourself as root or the rabbitmq user)"
        )
    _say(on_status, f"local: enabled the management plugin; waiting for {mhost}:{mport}")
    deadline = time.monotonic() + PLUGIN_WAIT_S
    while True:
        try:
            _check_management(LOCAL_MANAGEMENT_URL)
            _say(on_status, f"local: management API answers on {mhost}:{mport}")
            return
        except BrokerError as exc:
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"local: `{command}` succeeded but the management API on {mhost}:{mport} "
                    f"still did not answer after {PLUGIN_WAIT_S:.0f}s: {exc}"
                ) from exc
        time.sleep(PLUGIN_POLL_S)


def _testcontainers(on_status: Status | None, *, why: str) -> BrokerEndpoints:
    container = _testcontainer.RabbitContainer.start(_ready, on_status=on_status)
    return BrokerEndpoints(
        "testcontainers",
        container.amqp_url,
        container.management_url,
        f"testcontainers: {why}, so a throwaway {_testcontainer.IMAGE} container serves "
        f"{container.host}:{container.amqp_port} (management API on {container.management_port})",
        restartable=True,
        _container=container,
    )


# -- probes -----------------------------------------------------------------------------


class _ProbeError(BrokerError):
    """A failed check, with ``kind``: url, refused, dns, timeout, protocol, auth, vhost, other."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


def _check_amqp(url: str, timeout: float | None = None) -> None:
    """A real AMQP connect + close; a failure names what was wrong and how to fix it."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise _ProbeError(
            "url",
            f"AMQP check failed: URL {redact_url(url)!r} is wrong: expected "
            "amqp://user:password@host:5672/vhost",
        )
    where = f"{parts.hostname}:{_port(url, 'AMQP', 5671 if parts.scheme == 'amqps' else 5672)}"
    user = unquote(parts.username or "guest")
    try:
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.retry_delay = 0
        params.socket_timeout = timeout
        params.stack_timeout = timeout + 2
        params.blocked_connection_timeout = timeout
    except (ValueError, TypeError) as exc:
        raise _ProbeError(
            "url", f"AMQP check failed: URL {redact_url(url)!r} is wrong: {exc}"
        ) from exc
    try:
        with _quiet_pika():
            pika.BlockingConnection(params).close()
    except (
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.AuthenticationError,
    ) as exc:
        raise _ProbeError(
            "auth",
            f"AMQP check failed: {where} refused the credentials of user {user!r} "
            "(ACCESS_REFUSED): fix the user/password in the AMQP URL",
        ) from exc
    except pika.exceptions.ProbableAccessDeniedError as exc:
        vhost = params.virtual_host
        raise _ProbeError(
            "vhost",
            f"AMQP check failed: on {where} user {user!r} may not open vhost {vhost!r} "
            "(NOT_ALLOWED): fix the vhost in the AMQP URL (the default vhost / is written %2F "
            "or as an empty path) or grant the user permissions on it",
        ) from exc
    except pika.exceptions.IncompatibleProtocolError as exc:
        raise _ProbeError(
            "protocol",
            f"AMQP check failed: something answered on {where} but not AMQP 0-9-1: wrong port "
            "in the AMQP URL (the management API is not AMQP; TLS listeners need amqps://)?",
        ) from exc
    except AMQPConnectorStackTimeout as exc:
        raise _ProbeError(
            "protocol",
            f"AMQP check failed: {where} accepted the connection but no AMQP handshake within "
            f"{params.stack_timeout:g}s: wrong port in the AMQP URL (is it the management API?) "
            "or an overloaded broker",
        ) from exc
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as exc:
        raise _from_socket_error("AMQP", where, exc, "AMQP URL", timeout) from exc


@contextmanager
def _quiet_pika() -> Iterator[None]:
    """pika logs every failed connect at ERROR; a probe reports its own failure instead."""
    pika_logger = logging.getLogger("pika")
    before = pika_logger.level
    pika_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        pika_logger.setLevel(before)


def _check_management(url: str, timeout: float | None = None) -> dict[str, Any]:
    """GET /api/overview; a failure names what was wrong and how to fix it."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _ProbeError(
            "url",
            f"management API check failed: URL {redact_url(url)!r} is wrong: expected "
            "http://user:password@host:15672/",
        )
    where = (
        f"{parts.hostname}:{_port(url, 'management API', 443 if parts.scheme == 'https' else 80)}"
    )
    user = unquote(parts.username or "guest")
    password = unquote(parts.password or "guest")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    api = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/api/overview", "", ""))
    try:
        resp = requests.get(api, auth=(user, password), timeout=timeout)
    except requests.RequestException as exc:
        if (
            _cause(exc, http.client.HTTPException) is not None
            or _cause(exc, ConnectionResetError) is not None
        ):
            raise _ProbeError(
                "protocol",
                f"management API check failed: something answered on {where} but not HTTP: wrong "
                "port in the management URL (AMQP is not HTTP; the management API is on 15672)?",
            ) from exc
        raise _from_socket_error("management API", where, exc, "management URL", timeout) from exc
    if resp.status_code == 401:
        raise _ProbeError(
            "auth",
            f"management API check failed: {where} refused the credentials of user {user!r} "
            "(HTTP 401): fix the user/password in the management URL (the user also needs the "
            "'management' or 'monitoring' tag)",
        )
    if resp.status_code == 404:
        raise _ProbeError(
            "url",
            f"management API check failed: nothing at {redact_url(api)} (HTTP 404): fix the "
            "management URL's host, port or path prefix",
        )
    if resp.status_code != 200:
        raise _ProbeError(
            "other",
            f"management API check failed: {where} answered HTTP {resp.status_code} "
            "to /api/overview",
        )
    try:
        overview = resp.json()
    except ValueError:
        overview = None
    if not isinstance(overview, dict) or "rabbitmq_version" not in overview:
        raise _ProbeError(
            "url",
            f"management API check failed: {where} answered /api/overview but not like RabbitMQ's: "
            "fix the management URL",
        )
    return overview


def _port(url: str, what: str, default: int) -> int:
    """The URL's port (or ``default``); a non-number or out-of-range one is a url error."""
    try:
        return urlsplit(url).port or default
    except ValueError as exc:
        raise _ProbeError(
            "url", f"{what} check failed: URL {redact_url(url)!r} is wrong: {exc}"
        ) from exc


def _from_socket_error(
    what: str, where: str, exc: BaseException, url_name: str, timeout: float
) -> _ProbeError:
    """Refused / unknown host / timeout / other, worded for a person."""
    if _cause(exc, ConnectionRefusedError) is not None:
        return _ProbeError(
            "refused",
            f"{what} check failed: nothing is listening on {where} (connection refused): start "
            f"the broker or fix the host/port in the {url_name}",
        )
    if _cause(exc, socket.gaierror) is not None or "resolve" in str(exc).lower():
        return _ProbeError(
            "dns", f"{what} check failed: host of {where} not found (DNS): fix the {url_name}"
        )
    if _cause(exc, TimeoutError) is not None or isinstance(exc, requests.Timeout):
        return _ProbeError(
            "timeout",
            f"{what} check failed: no answer from {where} within {timeout:g}s "
            f"(firewall, wrong host, or a busy broker): check the {url_name}",
        )
    root = _cause(exc, OSError) or exc
    text = " ".join(f"{type(root).__name__}: {root}".split())[:200]
    return _ProbeError("other", f"{what} check failed: could not connect to {where}: {text}")


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` anywhere in ``exc``'s causes, contexts, args and ``reason``."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, kind):
            return item
        # ``reason``: urllib3; ``exception``: pika's connection workflow errors.
        stack.extend([item.__cause__, item.__context__, getattr(item, "reason", None)])
        stack.append(getattr(item, "exception", None))
        stack.extend(getattr(item, "exceptions", None) or [])
        stack.extend(item.args)
    return None


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default = {"amqp": 5672, "amqps": 5671, "http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.hostname or "127.0.0.1", parts.port or default


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _say(on_status: Status | None, message: str) -> None:
    logger.info("%s", message)
    if on_status is not None:
        on_status(message)
