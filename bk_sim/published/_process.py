"""The host side of the leaf runner: start it in an env, send commands, get typed events.

``PublishedLeafProcess`` is what a run engine's leaf host wraps. A reader thread parses
every stdout line into an event, hands it to ``on_event`` and keeps it; a command's
``Reply`` is matched by its ``id``. A runner that dies is reported as
``PublishedClientError`` to whoever waits on it, with the tail of its stderr, never a
hang: every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

from bk_sim.errors import PublishedClientError
from bk_sim.published._envs import PublishedEnv
from bk_sim.published._events import Ready, Reply, RunnerEvent, RunnerExited, parse_event

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
REPLY_MARGIN_S = 30.0
"""Added to a command's own timeout (a notification wait) before the host gives up."""
CREDENTIAL_FIELDS = ("id", "name", "session_token", "tree_id", "branch_id", "owner_id")
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class LeafSettings:
    """How one published client is built: transport and the package's config objects.

    ``None`` leaves the package's own default. ``verify_ssl`` is ``APIConfig.ssl``; it
    defaults to whether ``host`` is https, because the package also uses it to choose
    wss (a True value with an http host breaks its WebSocket connect). The reconnect
    settings go to ``RabbitMQConfig`` (AMQP) or ``WebSocketConfig`` (WebSocket); ``retry``
    holds ``RetryConfig`` fields.
    """

    host: str
    transport: str = "amqp"
    verify_ssl: bool | None = None
    proxies: Mapping[str, str] | None = None
    rabbitmq_host: str | None = None
    rabbitmq_port: int | None = None
    rabbitmq_ssl: bool | None = None
    reconnect_max_attempts: int | None = None
    reconnect_backoff_factor: float | None = None
    reconnect_max_delay: int | None = None
    retry: Mapping[str, Any] | None = None
    wait_for_run: bool | None = None
    run_check_interval_s: int | None = None

    @classmethod
    def for_broker(
        cls, host: str, amqp_url: str | None, *, transport: str = "amqp", **kwargs: Any
    ) -> LeafSettings:
        """Settings whose RabbitMQ host, port and TLS come from a broker URL
        (``amqp://…:5672`` plain, ``amqps://…`` TLS); the leaf's own credentials are used
        to log in, never the URL's."""
        if amqp_url:
            parts = urllib.parse.urlsplit(amqp_url)
            tls = parts.scheme == "amqps"
            kwargs.setdefault("rabbitmq_host", parts.hostname or "127.0.0.1")
            kwargs.setdefault("rabbitmq_port", parts.port or (5671 if tls else 5672))
            kwargs.setdefault("rabbitmq_ssl", tls)
        return cls(host=host, transport=transport, **kwargs)

    def to_command(self) -> dict[str, Any]:
        """The ``start_leaf`` fields (``api``, ``rabbitmq``, ``websocket``, ``retry``,
        ``run``) for the runner."""
        if self.transport not in ("amqp", "websocket"):
            raise PublishedClientError(
                f"unknown transport {self.transport!r}: expected amqp or websocket"
            )
        verify = self.verify_ssl
        if verify is None:
            verify = self.host.startswith("https://")
        api: dict[str, Any] = {"host": self.host.rstrip("/"), "ssl": verify}
        if self.proxies is not None:
            api["proxies"] = dict(self.proxies)
        reconnect = _drop_none(
            max_reconnect_attempts=self.reconnect_max_attempts,
            reconnect_backoff_factor=self.reconnect_backoff_factor,
            reconnect_max_delay=self.reconnect_max_delay,
        )
        command: dict[str, Any] = {"transport": self.transport, "api": api}
        if self.transport == "amqp":
            command["rabbitmq"] = {
                **_drop_none(
                    host=self.rabbitmq_host, port=self.rabbitmq_port, ssl=self.rabbitmq_ssl
                ),
                **reconnect,
            }
        elif reconnect:
            command["websocket"] = reconnect
        if self.retry:
            command["retry"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.retry.items()
            }
        run = _drop_none(wait_for_run=self.wait_for_run, check_interval_s=self.run_check_interval_s)
        if run:
            command["run"] = run
        return command


def runner_script() -> Path:
    """Where the runner script is on disk (it ships inside this package)."""
    resource = resources.files("bk_sim.published").joinpath("_runner.py")
    path = Path(str(resource))
    if not path.is_file():  # pragma: no cover - only a zipped install would do this
        raise PublishedClientError(f"the leaf runner script is not a file on disk: {resource}")
    return path


class PublishedLeafProcess:
    """One runner process inside ``env``, hosting any number of leaves.

    ``on_event`` is called from the reader thread for every event (keep it quick);
    events are also kept (``events()``) unless ``keep_events`` is False. Use as a context
    manager, or call ``start()`` and finally ``stop()``.
    """

    def __init__(
        self,
        env: PublishedEnv,
        workdir: str | Path,
        *,
        on_event: Callable[[RunnerEvent], None] | None = None,
        keep_events: bool = True,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.env = env
        self.workdir = Path(workdir)
        self._on_event = on_event
        self._keep = keep_events
        self._ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._events: list[RunnerEvent] = []
        self._replies: dict[str, Reply] = {}
        self._ready: Ready | None = None
        self._exited: RunnerExited | None = None
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._stderr_path = self.workdir / "runner.stderr.log"
        self._stderr: IO[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Ready:
        """Start the runner and wait for its ``ready`` line (versions, what it observes)."""
        if self._proc is not None:
            raise PublishedClientError("this leaf runner was already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self._stderr_path, "wb")  # noqa: SIM115 - closed in _read
        cmd = [
            str(self.env.python),
            "-I",
            "-u",
            str(runner_script()),
            "--workdir",
            str(self.workdir),
        ]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
                encoding="utf-8",
                bufsize=1,
                cwd=self.workdir,
                env=_runner_environ(),
                start_new_session=True,
            )
        except OSError as exc:
            self._stderr.close()
            raise PublishedClientError(
                f"could not start the leaf runner for {self.env.implementation}: {exc}"
            ) from None
        self._reader = threading.Thread(target=self._read, name=f"runner-{self.pid}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self._ready_timeout_s
        with self._cond:
            while self._ready is None:
                if self._exited is not None:
                    raise self._lost("starting")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise PublishedClientError(
                        f"leaf runner for {self.env.implementation} sent no 'ready' within "
                        f"{self._ready_timeout_s:g} s; killed it"
                    )
                self._cond.wait(left)
            return self._ready

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Ask the runner to close every leaf and exit; kill it when it does not in time.
        Returns its exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None and self._exited is None:
            with contextlib.suppress(PublishedClientError):
                self._send({"cmd": "shutdown", "id": self._next_id()})
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "leaf runner pid %s did not exit in %.0f s: killing it", proc.pid, timeout_s
                )
                self.kill()
        self._join_reader()
        if proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the runner (and anything it started in its session)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __enter__(self) -> PublishedLeafProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._exited is None

    @property
    def ready(self) -> Ready:
        if self._ready is None:
            raise PublishedClientError("the leaf runner is not started")
        return self._ready

    # ------------------------------------------------------------------ commands

    def send(self, cmd: str, *, leaf: str | None = None, **fields: Any) -> str:
        """Send one command without waiting; returns its id (its ``Reply`` carries it)."""
        request_id = self._next_id()
        message: dict[str, Any] = {"cmd": cmd, "id": request_id}
        if leaf is not None:
            message["leaf"] = leaf
        message.update(fields)
        self._send(message)
        return request_id

    def wait_reply(self, request_id: str, timeout_s: float) -> Reply:
        """The reply to ``request_id``; ``PublishedClientError`` on timeout or a lost runner."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while request_id not in self._replies:
                if self._exited is not None:
                    raise self._lost(f"waiting for reply {request_id}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishedClientError(
                        f"leaf runner for {self.env.implementation} (pid {self.pid}) did not "
                        f"reply to {request_id} within {timeout_s:g} s"
                    )
                self._cond.wait(left)
            return self._replies.pop(request_id)

    def request(self, cmd: str, *, leaf: str | None, timeout_s: float, **fields: Any) -> Reply:
        """Send a command and wait for its reply (``reply.ok`` says whether it worked)."""
        return self.wait_reply(self.send(cmd, leaf=leaf, **fields), timeout_s)

    def start_leaf(
        self,
        leaf: str,
        credentials: Mapping[str, str] | Any,
        settings: LeafSettings,
        *,
        timeout_s: float = 60.0,
    ) -> Reply:
        """Build the published ``Client`` for ``leaf`` (the 2.9 AMQP constructor blocks on
        the broker: ``timeout_s`` bounds the wait, not the client)."""
        return self.request(
            "start_leaf",
            leaf=leaf,
            timeout_s=timeout_s,
            credentials=_credentials_dict(credentials),
            **settings.to_command(),
        )

    def upload(self, leaf: str, path: str | Path, *, timeout_s: float = 120.0) -> Reply:
        """``client.file_upload(path)``: the file the harness wrote; ``result.file_id``."""
        return self.request(
            "upload", leaf=leaf, timeout_s=timeout_s, path=str(Path(path).resolve())
        )

    def wait_notification(self, leaf: str, *, timeout_s: float) -> Reply:
        """``client.queue.get(timeout)``: ``result.aggregation_id`` or ``ok`` False."""
        return self.request(
            "wait_notification", leaf=leaf, timeout_s=timeout_s + REPLY_MARGIN_S, wait_s=timeout_s
        )

    def download(self, leaf: str, file_id: str, *, timeout_s: float = 120.0) -> Reply:
        """``client.file_download(file_id)``: ``result.path`` is the aggregate on disk."""
        return self.request("download", leaf=leaf, timeout_s=timeout_s, file_id=file_id)

    def play_round(
        self,
        leaf: str,
        path: str | Path,
        *,
        notification_timeout_s: float,
        timeout_s: float | None = None,
    ) -> Reply:
        """Upload, wait for the aggregation notification, download, in one command;
        ``result`` has ``upload``, ``wait_notification`` and ``download`` parts.
        ``timeout_s`` (default: the notification wait plus two minutes) bounds it all."""
        limit = timeout_s if timeout_s is not None else notification_timeout_s + 4 * REPLY_MARGIN_S
        return self.wait_reply(self.send_round(leaf, path, notification_timeout_s), limit)

    def send_round(self, leaf: str, path: str | Path, notification_timeout_s: float) -> str:
        """``play_round`` without waiting (rounds of many leaves run in parallel)."""
        return self.send(
            "play_round",
            leaf=leaf,
            path=str(Path(path).resolve()),
            wait_s=notification_timeout_s,
        )

    def status(self, leaf: str, *, timeout_s: float = 30.0) -> Reply:
        """``run_status``, ``run_number``, ``consumer_alive``, ``queue_size``."""
        return self.request("status", leaf=leaf, timeout_s=timeout_s)

    def stop_leaf(self, leaf: str, *, timeout_s: float = 30.0) -> Reply:
        """``client.close()`` for one leaf."""
        return self.request("stop_leaf", leaf=leaf, timeout_s=timeout_s)

    # ------------------------------------------------------------------ events

    def events(self, kind: type[RunnerEvent] | None = None) -> list[RunnerEvent]:
        """Events received so far (of one class when ``kind`` is given)."""
        with self._cond:
            return [e for e in self._events if kind is None or isinstance(e, kind)]

    def wait_for(
        self, predicate: Callable[[RunnerEvent], bool], *, timeout_s: float
    ) -> RunnerEvent:
        """The first kept event matching ``predicate`` (already received or arriving)."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for event in self._events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self._events)
                if self._exited is not None:
                    raise self._lost("waiting for an event")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishedClientError(
                        f"no matching event from the leaf runner within {timeout_s:g} s"
                    )
                self._cond.wait(left)

    # ------------------------------------------------------------------ internals

    def _next_id(self) -> str:
        return f"c{next(self._ids)}"

    def _send(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise PublishedClientError("the leaf runner is not started")
        if self._exited is not None or proc.poll() is not None:
            raise self._lost(f"sending {message.get('cmd')!r}")
        line = json.dumps(message, separators=(",", ":")) + "\n"
        try:
            with self._send_lock:
                proc.stdin.write(line)
                proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._lost(f"sending {message.get('cmd')!r}") from None

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            for line in proc.stdout:
                if not line.strip():
                    continue
                try:
                    event = parse_event(line)
                except ValueError:
                    log.warning("leaf runner pid %s wrote a non-event line: %.200s", proc.pid, line)
                    continue
                self._deliver(event)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            with contextlib.suppress(OSError, ValueError):
                proc.stdout.close()
            if self._stderr is not None:
                self._stderr.close()
            exited = RunnerExited(
                t=time.time(), leaf=None, returncode=proc.poll(), stderr_tail=self._stderr_tail()
            )
            self._deliver(exited)

    def _deliver(self, event: RunnerEvent) -> None:
        with self._cond:
            if isinstance(event, Ready):
                self._ready = event
            elif isinstance(event, Reply) and event.id is not None:
                self._replies[event.id] = event
            elif isinstance(event, RunnerExited):
                self._exited = event
            if self._keep:
                self._events.append(event)
            self._cond.notify_all()
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - a listener's bug must not kill the reader
                log.exception("on_event listener failed for %s", event.kind)

    def _join_reader(self) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=15)

    def _stderr_tail(self) -> str:
        try:
            with open(self._stderr_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - _STDERR_TAIL))
                return fh.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def _lost(self, doing: str) -> PublishedClientError:
        exited = self._exited
        code = (
            exited.returncode if exited is not None else (self._proc.poll() if self._proc else None)
        )
        tail = exited.stderr_tail if exited is not None else self._stderr_tail()
        last = tail.strip().splitlines()[-1] if tail.strip() else "no stderr output"
        return PublishedClientError(
            f"leaf runner for {self.env.implementation} (pid {self.pid}) exited with code "
            f"{code} while {doing}: {last[:300]} (full stderr: {self._stderr_path})"
        )


def _credentials_dict(credentials: Mapping[str, str] | Any) -> dict[str, str]:
    if not isinstance(credentials, Mapping):
        to_dict = getattr(credentials, "to_dict", None)
        if to_dict is None:
            raise PublishedClientError("credentials must be a mapping or have to_dict()")
        credentials = to_dict()
    missing = [k for k in CREDENTIAL_FIELDS if not credentials.get(k)]
    if missing:
        raise PublishedClientError(f"leaf credentials lack {', '.join(missing)}")
    return {k: str(credentials[k]) for k in CREDENTIAL_FIELDS}


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _runner_environ() -> dict[str, str]:
    """The harness's environment minus what would point the env's python elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env
