"""bk-sim's own RabbitMQ node, started from the local installation (provider ``process``).

A run that restarts its broker, or needs more connections than the machine's shared
broker can hold, gets a node of its own: a unique node name, free loopback ports (AMQP,
optional AMQPS, management API, Erlang distribution), a private directory for its data,
logs, config, enabled plugins and Erlang cookie (``HOME``), and an open-file limit raised
inside the start command (``su`` and service managers reset limits, so a ulimit in the
caller's shell does not reach the node). It never reads ``/etc/rabbitmq`` and never talks
to another node, so the shared broker is untouched whatever this one does.

The node runs in the foreground of its own session; ``stop`` sends SIGTERM (RabbitMQ's
graceful shutdown) and SIGKILLs what is left; ``remove`` also deletes the directory.
``restart`` stops and starts the same node on the same ports and data (durable queues and
persistent messages survive). Each directory records its owner's pid: a later start
sweeps nodes whose owner died without cleaning up (SIGKILL of the harness).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bk_sim.errors import BrokerError

logger = logging.getLogger(__name__)

#: Where the real (not wrapper) ``rabbitmq-server`` script lives, most specific first.
#: Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that writes the shared
#: ``/var/log/rabbitmq/startup_log`` and ``cd``s into the shared data dir: never used.
SERVER_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/rabbitmq/bin/rabbitmq-server",
    "/usr/local/opt/rabbitmq/sbin/rabbitmq-server",
    "/opt/homebrew/opt/rabbitmq/sbin/rabbitmq-server",
    "/opt/rabbitmq/sbin/rabbitmq-server",
)
ENV_SERVER = "BK_SIM_RABBITMQ_SERVER"
#: The user a node runs as when bk-sim runs as root (Erlang refuses nothing as root, but
#: the shared installation's files belong to this user).
RUN_AS = "rabbitmq"
#: Enough descriptors for 10,000 connections: RabbitMQ gives sockets ~90 % of them.
NOFILE = 20000
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.25
DIR_PREFIX = "bk-sim-rabbit-"
OWNER_FILE = "owner.pid"
USER = "guest"
AMQPS_DEFAULT_PORT = 5671
#: Lowest port chosen for a node (the ephemeral range starts above; see ``free_ports``).
FIXED_PORT_MIN = 20000
PASSWORD = "guest"

Status = Callable[[str], None]
#: (amqp_url, management_url) -> None; raises BrokerError while the node is not ready.
ReadyCheck = Callable[[str, str], None]


class _EarlyExit(BrokerError):
    """The node exited before it answered."""


@dataclass(frozen=True)
class NodeTLS:
    """Certificate files for the node's AMQPS listener (PEM paths)."""

    cacertfile: Path
    certfile: Path
    keyfile: Path


def find_server() -> tuple[Path | None, str]:
    """The real ``rabbitmq-server`` script, or None and what is missing, in one line."""
    given = os.environ.get(ENV_SERVER)
    if given:
        path = Path(given)
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"{ENV_SERVER}={given}"
        return None, f"{ENV_SERVER}={given} is not an executable file"
    for cand in SERVER_CANDIDATES:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return Path(cand), cand
    found = shutil.which("rabbitmq-server")
    if found and not _is_debian_wrapper(Path(found)):
        return Path(found).resolve(), found
    if shutil.which("erl") is None:
        return None, (
            "no RabbitMQ installation: neither rabbitmq-server nor Erlang (erl) is installed "
            "(apt-get install rabbitmq-server, brew install rabbitmq, or set "
            f"{ENV_SERVER} to the rabbitmq-server script of an unpacked release)"
        )
    return None, (
        "no RabbitMQ installation: Erlang is installed but rabbitmq-server is not (looked in "
        f"{', '.join(SERVER_CANDIDATES)} and on PATH; apt-get install rabbitmq-server, or set "
        f"{ENV_SERVER})"
    )


def process_available() -> tuple[bool, str]:
    """Whether bk-sim can start a node of its own here, and why (not)."""
    server, why = find_server()
    if server is None:
        return False, why
    if shutil.which("erl") is None and not (server.parent.parent / "erts").exists():
        return False, f"{server} found but Erlang (erl) is not on PATH"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return False, f"running as root but there is no {RUN_AS!r} user to run the node as"
    return True, f"RabbitMQ installed ({server})"


def _is_debian_wrapper(path: Path) -> bool:
    try:
        return "/usr/lib/rabbitmq/bin/" in path.read_text(errors="replace")[:4000]
    except OSError:
        return False


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports free right now, below the ephemeral range.

    A port from the ephemeral range (what ``bind(0)`` hands out) can be taken as the local
    port of any outgoing connection while the node is down for a restart or still
    booting, and the node then fails to listen and stops; ports below it are only ever
    taken by an explicit bind. Falls back to ``bind(0)`` when that range is too small.
    """
    low, _ = _ephemeral_range()
    chosen: list[int] = []
    if low > FIXED_PORT_MIN + 100:
        candidates = random.Random().sample(
            range(FIXED_PORT_MIN, low), k=min(400, low - FIXED_PORT_MIN)
        )
        for port in candidates:
            if len(chosen) == count:
                break
            if _port_free(port):
                chosen.append(port)
    if len(chosen) == count:
        return chosen
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count - len(chosen))]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return chosen + [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class ProcessNode:
    """One private RabbitMQ node: ``start``, ``restart`` (data kept), ``remove``."""

    def __init__(
        self,
        server: Path,
        *,
        tls: NodeTLS | None = None,
        nofile: int = NOFILE,
        base_dir: Path | None = None,
    ) -> None:
        self.server = server
        self.tls = tls
        self.nofile = nofile
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base_dir))
        self.nodename = f"bksim-{secrets.token_hex(4)}@localhost"
        ports = free_ports(5)
        self.amqp_port, self.management_port, self.dist_port, self.amqps_port = ports[:4]
        self._epmd_port = ports[4]
        if tls is not None and _port_free(AMQPS_DEFAULT_PORT):
            # The published client's default (rbmq_port=5671) then works as it is.
            self.amqps_port = AMQPS_DEFAULT_PORT
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._run_as = RUN_AS if os.geteuid() == 0 else None
        #: Seconds each start took (first: the initial start, then one per restart).
        self.start_times: list[float] = []
        self.stop_times: list[float] = []
        self._write_files()

    # -- what clients use
    @property
    def amqp_url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.amqp_port}/"

    @property
    def amqps_url(self) -> str | None:
        if self.tls is None:
            return None
        return f"amqps://{USER}:{PASSWORD}@127.0.0.1:{self.amqps_port}/"

    @property
    def management_url(self) -> str:
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.management_port}/"

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / "node.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def rabbitmqctl(self, *args: str) -> list[str]:
        """The command line that reaches this node with ``rabbitmqctl`` (same cookie)."""
        ctl = self.server.with_name("rabbitmqctl")
        inner = " ".join(
            shlex.quote(x)
            for x in ("env", *self._env_assignments(), str(ctl), "-n", self.nodename, *args)
        )
        return self._wrap(inner)

    # -- lifecycle
    def start(
        self,
        ready: ReadyCheck,
        *,
        timeout: float = START_TIMEOUT_S,
        on_status: Status | None = None,
    ) -> float:
        """Start the node, wait until AMQP and the management API answer; seconds taken.

        A node that stops by itself while booting is started once more (seen rarely here
        on a loaded machine: a clean shutdown seconds into the boot); twice is an error.
        """
        t0 = time.monotonic()
        try:
            self._start_once(ready, timeout)
        except _EarlyExit as exc:
            logger.warning("process: %s; starting it once more", exc)
            self._start_once(ready, timeout)
        took = time.monotonic() - t0
        self.start_times.append(took)
        logger.info("process: node %s answered after %.1f s", self.nodename, took)
        return took

    def _start_once(self, ready: ReadyCheck, timeout: float) -> None:
        self._ensure_epmd()
        inner = f"ulimit -n {self.nofile} 2>/dev/null || ulimit -n $(ulimit -Hn); exec " + " ".join(
            shlex.quote(x) for x in ("env", *self._env_assignments(), str(self.server))
        )
        log = open(self.dir / "log" / "server.out", "ab")  # noqa: SIM115 - handed to Popen
        try:
            self._proc = subprocess.Popen(
                self._wrap(inner),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        except OSError as exc:
            raise BrokerError(f"process: could not start {self.server}: {exc}") from exc
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        last: BrokerError | None = None
        while True:
            proc = self._proc
            if proc.poll() is not None:
                self._proc = None
                self._kill_leftovers(signal.SIGKILL)
                taken = [p for p in self._ports() if not _port_free(p)]
                why = (
                    f" (port {', '.join(map(str, taken))} taken by another process)"
                    if taken
                    else ""
                )
                raise _EarlyExit(
                    f"process: RabbitMQ node {self.nodename} stopped while starting{why}: "
                    f"{self.log_tail()}"
                )
            try:
                ready(self.amqp_url, self.management_url)
                break
            except BrokerError as exc:
                last = exc
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"process: RabbitMQ node {self.nodename} did not answer within {timeout:g} s "
                    f"({last}): {self.log_tail()}"
                )
            time.sleep(POLL_S)

    def stop(self, *, timeout: float = STOP_TIMEOUT_S) -> float:
        """Graceful stop (SIGTERM), SIGKILL after ``timeout``; seconds taken. Never raises."""
        t0 = time.monotonic()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGTERM to the Erlang VM itself: RabbitMQ's graceful shutdown. Not to its su
            # wrapper, which answers SIGTERM by SIGKILLing its session after 2 s.
            beams = _pids_mentioning(f"-home {self.dir / 'home'}")
            for pid in beams:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            if not beams:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("process: node %s ignored SIGTERM; killing it", self.nodename)
        # Whatever is left of the node (its VM, its su/sh wrapper).
        self._kill_leftovers(signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        took = time.monotonic() - t0
        self.stop_times.append(took)
        return took

    def restart(
        self,
        ready: ReadyCheck,
        *,
        timeout: float = START_TIMEOUT_S,
        on_status: Status | None = None,
    ) -> tuple[float, float]:
        """Stop and start the same node (same ports, data kept); (stop_s, start_s)."""
        _say(on_status, f"process: restarting RabbitMQ node {self.nodename}")
        stopped = self.stop()
        started = self.start(ready, timeout=timeout, on_status=on_status)
        _say(on_status, f"process: node back after {stopped:.1f} s down + {started:.1f} s start")
        return stopped, started

    def remove(self) -> None:
        """Stop the node (and a private epmd) and delete its directory; never raises."""
        try:
            self.stop()
        finally:
            if self._epmd is not None:
                with contextlib.suppress(OSError):
                    self._epmd.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._epmd.wait(5)
                self._epmd = None
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir.exists():
                logger.warning("process: could not remove %s", self.dir)

    def open_files_limit(self) -> int | None:
        """The running VM's open-file limit (``/proc/<pid>/limits``), or None."""
        for pid in _pids_mentioning(f"-home {self.dir / 'home'}"):
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
                    if line.startswith("Max open files"):
                        return int(line.split()[3])
        return None

    def log_tail(self, lines: int = 4) -> str:
        texts: list[str] = []
        for path in (self.dir / "log" / "server.out", self.log_path):
            with contextlib.suppress(OSError):
                texts += path.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(" ".join(t.split())[:200] for t in texts[-lines:]) or "(no log)"

    # -- helpers
    def _ports(self) -> list[int]:
        ports = [self.amqp_port, self.management_port, self.dist_port]
        return ports + ([self.amqps_port] if self.tls is not None else [])

    def _wrap(self, inner: str) -> list[str]:
        if self._run_as is None:
            return ["/bin/sh", "-c", inner]
        return ["su", self._run_as, "-s", "/bin/sh", "-c", inner]

    def _env_assignments(self) -> list[str]:
        d = self.dir
        env = {
            "HOME": str(d / "home"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_LOGS": str(self.log_path),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self._epmd_port),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        return [f"{k}={v}" for k, v in env.items()]

    def _write_files(self) -> None:
        d = self.dir
        for sub in ("home", "mnesia", "log"):
            (d / sub).mkdir()
        cookie = d / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (d / "rabbitmq-env.conf").write_text("# bk-sim: no shared settings\n")
        (d / "enabled_plugins").write_text("[rabbitmq_management].\n")
        conf = [
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {self.management_port}",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.tls is not None:
            # Copies the node's user can read wherever the originals live (a 0700 dir).
            (d / "tls").mkdir()
            for src in (self.tls.cacertfile, self.tls.certfile, self.tls.keyfile):
                shutil.copyfile(src, d / "tls" / src.name)
            (d / "tls" / self.tls.keyfile.name).chmod(0o600)
            conf += [
                f"listeners.ssl.1 = 127.0.0.1:{self.amqps_port}",
                f"ssl_options.cacertfile = {d / 'tls' / self.tls.cacertfile.name}",
                f"ssl_options.certfile = {d / 'tls' / self.tls.certfile.name}",
                f"ssl_options.keyfile = {d / 'tls' / self.tls.keyfile.name}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (d / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (d / OWNER_FILE).write_text(str(os.getpid()))
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            for path in [d, *d.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _ensure_epmd(self) -> None:
        """The node registers with an epmd: the machine's when one runs on 4369 (sharing it
        is harmless), else a private one on this node's port, stopped in ``remove``."""
        if self._epmd is not None and self._epmd.poll() is None:
            return
        if _port_open(4369):
            self._epmd_port = 4369
            return
        epmd = shutil.which("epmd")
        if epmd is None:
            return  # erl starts its own (daemonised); the sweep below cannot see it
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self._epmd_port), "-address", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _kill_leftovers(self, sig: signal.Signals) -> None:
        for pid in _pids_mentioning(str(self.dir)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _pids_mentioning(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (a node name or directory)."""
    found: list[int] = []
    me = os.getpid()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline:
            found.append(int(entry.name))
    return found


def sweep_orphans(base_dir: Path | None = None) -> list[Path]:
    """Stop nodes and delete directories left by bk-sim processes that died (SIGKILL)."""
    base = Path(base_dir or tempfile.gettempdir())
    removed: list[Path] = []
    for d in base.glob(f"{DIR_PREFIX}*"):
        try:
            owner = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        for pid in _pids_mentioning(str(d)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        logger.warning("process: removed the broker node left by dead process %d: %s", owner, d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _say(on_status: Status | None, message: str) -> None:
    logger.info("%s", message)
    if on_status is not None:
        on_status(message)
