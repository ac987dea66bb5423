"""Leaf runner: drives the published ``branchkey`` client from INSIDE its own env.

This file is shipped as package data and run as a script with the env's python
(``python -I _runner.py --workdir DIR``). It must never import bk_sim: the env holds the
published release's pinned numpy (1.26.4 for 2.9.0), not bk-sim's. It does not import
numpy either: the harness writes every ``.npz`` with its own numpy and reads every
downloaded aggregate with it; this runner only hands files to the client and reports.

Protocol (JSON lines; docs/published-client.md has the full table):

- stdin, one command per line: ``{"cmd": ..., "id": ..., "leaf": ..., ...}``. Commands:
  ``start_leaf``, ``upload``, ``wait_notification``, ``download``, ``play_round``,
  ``status``, ``stop_leaf``, ``shutdown``. Each gets exactly one ``reply`` event with the
  same ``id``. Commands for one leaf run in order on that leaf's thread; leaves run in
  parallel. EOF on stdin means shutdown.
- stdout, one event per line: ``{"event": ..., "t": <unix time>, "leaf": ..., ...}``.
  First ``ready``; then ``reply`` events and observations (``http_attempt``,
  ``http_request``, ``http_retry_wait``, ``notification``, ``notification_blocked``,
  ``notification_dropped``, ``run_status``, ``consumer``, ``consumer_stopped``,
  ``log``, ``print``); last ``bye``.

Everything is observed from outside the package: logging handlers, urllib3's logging and
``Retry.sleep``, wrappers around the session's adapter, the client's queue class and
methods. The package's files are never changed. What cannot be seen is listed in the
``ready`` event's ``unobserved``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO

PROTOCOL_VERSION = 1
CREDENTIAL_FIELDS = ("id", "name", "session_token", "tree_id", "branch_id", "owner_id")
_CONSUMER_POLL_S = 0.2
_SHUTDOWN_CLOSE_S = 10.0


# --------------------------------------------------------------------------- output


class _Emitter:
    """Writes events as JSON lines on the protocol stream (the original stdout)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, leaf: str | None = None, **fields: Any) -> None:
        record: dict[str, Any] = {"event": event, "t": round(time.time(), 6), "leaf": leaf}
        record.update(fields)
        line = json.dumps(record, default=str, separators=(",", ":"))
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # the host is gone: nothing left to tell
                pass


_OUT: _Emitter


def _current_leaf() -> str | None:
    leaf = getattr(threading.current_thread(), "_bk_leaf", None)
    return leaf if isinstance(leaf, str) else None


def _set_thread_attr(name: str, value: Any) -> None:
    setattr(threading.current_thread(), name, value)


def _redact(url: str) -> str:
    """No user info, no query (pre-signed URLs carry their signature there)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return url.split("?", 1)[0]


# --------------------------------------------------------------------------- observers


class _PrintBridge(io.TextIOBase):
    """The package prints ("Starting Consumer", "downloaded file ..."): each printed line
    becomes a ``print`` event instead of corrupting the protocol stream."""

    def __init__(self) -> None:
        self._buffers: dict[int, str] = {}
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        ident = threading.get_ident()
        with self._lock:
            buf = self._buffers.get(ident, "") + text
            *lines, rest = buf.split("\n")
            self._buffers[ident] = rest
        for line in lines:
            if line.strip():
                _OUT.emit("print", _current_leaf(), text=line[:2000])
        return len(text)


_TICKET = re.compile(r"(ticket[=:]\s*)[^\s&.]+")
"""The package logs a prefix of its single-use WebSocket ticket; events never carry it."""

_CONSUMER_PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("reconnect_wait", re.compile(r"attempt (\d+) failed\. Retrying in ([\d.]+)s")),
    ("gave_up", re.compile(r"Failed to (?:re)?connect after|Max reconnection|Failed to reconnect")),
    ("connection_lost", re.compile(r"Connection (?:lost|closed)")),
    ("reconnecting", re.compile(r"Attempting to reconnect")),
    ("reconnected", re.compile(r"Reconnection successful")),
    ("connected", re.compile(r"Connected to WebSocket")),
    ("consuming", re.compile(r"Starting rabbitmq consumer|Starting to listen")),
    ("ticket", re.compile(r"Obtained ticket")),
    ("message", re.compile(r"Message received|Received aggregation_id|Received run_status")),
    ("connect_error", re.compile(r"Error while connecting|HTTP client error|URI invalid")),
    ("stopping", re.compile(r"Stopping|Consumer stopped")),
    ("error", re.compile(r"Unexpected error|Failed")),
)


_DOWN_PHASES = frozenset(
    {"connection_lost", "ticket", "connect_error", "reconnect_wait", "reconnecting", "gave_up"}
)


class _LogBridge(logging.Handler):
    """Turns log records into events: urllib3's per-attempt lines into ``http_attempt``,
    the package's consumer lines into ``consumer`` phases, the rest into ``log``."""

    def __init__(self, package_dir: str) -> None:
        super().__init__(level=logging.DEBUG)
        self._package_dir = package_dir
        self._state: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit(record)
        except Exception:  # noqa: BLE001 - observing must never break the client
            pass

    def _emit(self, record: logging.LogRecord) -> None:
        leaf = _current_leaf()
        if record.name.startswith("urllib3"):
            if self._urllib3(record, leaf):
                return
            if record.levelno < logging.WARNING:
                return
        from_package = record.pathname.startswith(self._package_dir)
        if not from_package and record.levelno < logging.INFO:
            return
        message = _TICKET.sub(r"\1***", record.getMessage())
        source = "branchkey" if from_package else record.name.split(".", 1)[0]
        _OUT.emit(
            "log",
            leaf,
            level=record.levelname,
            source=source,
            logger=record.name,
            message=message[:2000],
        )
        if from_package:
            for phase, pattern in _CONSUMER_PHASES:
                match = pattern.search(message)
                if match is None:
                    continue
                fields: dict[str, Any] = {}
                if phase == "reconnect_wait":
                    fields = {"attempt": int(match.group(1)), "delay_s": float(match.group(2))}
                phase = self._track(leaf, phase, message)
                _OUT.emit("consumer", leaf, phase=phase, message=message[:500], **fields)
                break

    def _track(self, leaf: str | None, phase: str, message: str) -> str:
        """Follow each leaf's consumer up/down so one loss is one ``connection_lost``.

        A second "lost" line for the same loss (the WebSocket consumer logs "Connection
        closed" and then "Connection lost") becomes ``error``. A consumer that was
        consuming and now fetches a ticket or fails to connect lost its connection with no
        line at all (a clean WebSocket close ends the package's receive loop silently):
        a ``connection_lost`` marked ``inferred`` is emitted first."""
        key = leaf or ""
        was = self._state.get(key)
        if phase == "consuming":
            self._state[key] = "up"
        elif phase in _DOWN_PHASES:
            self._state[key] = "down"
            if phase == "connection_lost":
                return "error" if was == "down" else phase
            if was == "up":
                _OUT.emit(
                    "consumer",
                    leaf,
                    phase="connection_lost",
                    message=f"inferred: '{message[:200]}' while consuming",
                    inferred=True,
                )
        return phase

    def _urllib3(self, record: logging.LogRecord, leaf: str | None) -> bool:
        """True when the record was turned into an HTTP event."""
        msg = str(record.msg)
        args = record.args if isinstance(record.args, tuple) else ()
        request = getattr(threading.current_thread(), "_bk_request", None)
        if msg.startswith('%s://%s:%s "%s %s %s" %s') and len(args) >= 7:
            scheme, host, port, method, path = (str(a) for a in args[:5])
            url = _redact(f"{scheme}://{host}:{port}{path}")
            status: int | str = int(str(args[6])) if str(args[6]).isdigit() else str(args[6])
            attempt = None
            if isinstance(request, dict):
                request["attempts"] += 1
                attempt = request["attempts"]
            _OUT.emit("http_attempt", leaf, method=method, url=url, status=status, attempt=attempt)
            return True
        if msg.startswith("Retrying (") and len(args) >= 3:
            attempt = None
            if isinstance(request, dict):
                request["attempts"] += 1
                attempt = request["attempts"]
            _OUT.emit(
                "http_attempt",
                leaf,
                attempt=attempt,
                method=request.get("method") if isinstance(request, dict) else None,
                url=_redact(str(args[2])) if "://" in str(args[2]) else str(args[2]),
                status=None,
                error=str(args[1])[:500],
            )
            return True
        if msg.startswith("Incremented Retry"):
            _OUT.emit("http_retry", leaf, detail=record.getMessage()[:500])
            return True
        return False


def _wrap_session(session: Any) -> None:
    """Wrap each mounted adapter's ``send``: one ``http_request`` per client call, with
    the attempts urllib3 made for it (the retries happen below ``send``)."""
    for adapter in list(getattr(session, "adapters", {}).values()):
        original = adapter.send
        if getattr(original, "_bk_wrapped", False):
            continue

        def send(request: Any, *args: Any, _orig: Any = original, **kwargs: Any) -> Any:
            leaf = _current_leaf()
            state = {"method": request.method, "url": _redact(request.url), "attempts": 0}
            previous = getattr(threading.current_thread(), "_bk_request", None)
            _set_thread_attr("_bk_request", state)
            started = time.monotonic()
            try:
                response = _orig(request, *args, **kwargs)
            except Exception as exc:
                _OUT.emit(
                    "http_request",
                    leaf,
                    method=state["method"],
                    url=state["url"],
                    status=None,
                    error=f"{type(exc).__name__}: {exc}"[:500],
                    attempts=int(state["attempts"]) + 1,
                    duration_s=round(time.monotonic() - started, 6),
                )
                raise
            finally:
                _set_thread_attr("_bk_request", previous)
            _OUT.emit(
                "http_request",
                leaf,
                method=state["method"],
                url=state["url"],
                status=response.status_code,
                attempts=max(1, int(state["attempts"])),
                duration_s=round(time.monotonic() - started, 6),
            )
            return response

        send._bk_wrapped = True  # type: ignore[attr-defined]
        adapter.send = send


def _observed_queue_class(base: type[Any]) -> type[Any]:
    """A subclass of the client's queue class that reports what goes in and out."""

    class ObservedQueue(base):  # type: ignore[misc]
        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            leaf = _current_leaf()
            was_full = self.full()
            _OUT.emit("notification", leaf, aggregation_id=str(item), queue_full=was_full)
            started = time.monotonic()
            super().put(item, block, timeout)
            waited = time.monotonic() - started
            if was_full or waited > 0.01:
                _OUT.emit(
                    "notification_blocked",
                    leaf,
                    aggregation_id=str(item),
                    blocked_s=round(waited, 6),
                )

        def get(self, block: bool = True, timeout: float | None = None) -> Any:
            item = super().get(block, timeout)
            role = getattr(threading.current_thread(), "_bk_role", None)
            if role != "taker":
                _OUT.emit(
                    "notification_dropped",
                    _current_leaf(),
                    aggregation_id=str(item),
                    by="close" if role == "close" else "client",
                )
            return item

    ObservedQueue.__name__ = f"Observed{base.__name__}"
    return ObservedQueue


class _Observation:
    """Installs every observer once, before the first client is built."""

    def __init__(self, bk: Any, client_module: Any) -> None:
        self.observed: list[str] = []
        self.unobserved: list[dict[str, str]] = []
        self.queue_patched = False
        package_dir = os.path.dirname(os.path.abspath(bk.__file__))
        self._install_thread_propagation()
        self._install_logging(package_dir)
        self._install_retry_sleep()
        self._install_session(bk)
        self._install_queue(client_module)
        self._install_run_status(bk.Client)

    def _miss(self, what: str, why: str) -> None:
        self.unobserved.append({"what": what, "why": why})

    def _install_thread_propagation(self) -> None:
        """Threads started by a leaf's thread (the consumer) carry its leaf key, so their
        events name the leaf."""
        original = threading.Thread.start

        def start(thread: threading.Thread) -> None:
            leaf = _current_leaf()
            if leaf is not None and getattr(thread, "_bk_leaf", None) is None:
                thread._bk_leaf = leaf  # type: ignore[attr-defined]
            original(thread)

        threading.Thread.start = start  # type: ignore[method-assign, assignment]

    def _install_logging(self, package_dir: str) -> None:
        root = logging.getLogger()
        root.handlers[:] = [_LogBridge(package_dir)]
        root.setLevel(logging.DEBUG)
        for name, level in (
            ("pika", logging.INFO),
            ("websockets", logging.INFO),
            ("asyncio", logging.WARNING),
            ("aiohttp", logging.INFO),
            ("charset_normalizer", logging.WARNING),
        ):
            logging.getLogger(name).setLevel(level)
        self.observed += ["log", "consumer"]

    def _install_retry_sleep(self) -> None:
        try:
            retry_module = importlib.import_module("urllib3.util.retry")
            retry_cls = retry_module.Retry
            original = retry_cls.sleep
        except (ImportError, AttributeError):
            self._miss("http_retry_wait", "urllib3 Retry.sleep not found: retry waits unseen")
            return

        def sleep(self: Any, response: Any = None) -> None:
            started = time.monotonic()
            try:
                original(self, response)
            finally:
                request = getattr(threading.current_thread(), "_bk_request", None)
                _OUT.emit(
                    "http_retry_wait",
                    _current_leaf(),
                    url=request.get("url") if isinstance(request, dict) else None,
                    seconds=round(time.monotonic() - started, 6),
                    retry_after=response is not None
                    and response.headers.get("Retry-After") is not None,
                )

        retry_cls.sleep = sleep
        self.observed.append("http_retry_wait")

    def _install_session(self, bk: Any) -> None:
        retry_cls = getattr(bk, "RetryConfig", None)
        original = getattr(retry_cls, "create_session", None)
        if retry_cls is None or original is None:
            self._miss("http_request", "RetryConfig.create_session not found: HTTP calls unseen")
            return

        def create_session(self: Any) -> Any:
            session = original(self)
            _wrap_session(session)
            return session

        retry_cls.create_session = create_session
        self.observed += ["http_request", "http_attempt"]

    def _install_queue(self, client_module: Any) -> None:
        base = getattr(client_module, "LifoQueue", None)
        self.observed += ["notification", "notification_blocked", "notification_dropped"]
        if not isinstance(base, type):
            self.queue_patched = False
            self._miss(
                "notification_during_construction",
                "branchkey.client has no LifoQueue: each client's queue is wrapped after "
                "construction, so notifications that arrive while it is built are unseen",
            )
            return
        client_module.LifoQueue = _observed_queue_class(base)
        self.queue_patched = True

    def _install_run_status(self, client_cls: Any) -> None:
        name = "_Client__update_run_status"
        original = getattr(client_cls, name, None)
        if original is None:
            self._miss("run_status", "Client has no run-status callback to wrap")
            return

        def update(self: Any, status: Any) -> Any:
            _OUT.emit("run_status", _current_leaf(), run_status=str(status))
            return original(self, status)

        setattr(client_cls, name, update)
        self.observed.append("run_status")


# --------------------------------------------------------------------------- leaves


class CommandError(Exception):
    """A command that cannot be carried out; its message goes into the reply."""


@dataclasses.dataclass
class _Leaf:
    key: str
    workdir: str
    client: Any = None
    stopping: bool = False
    commands: queue.Queue[dict[str, Any] | None] = dataclasses.field(default_factory=queue.Queue)
    thread: threading.Thread | None = None


class Runner:
    """Owns the leaves of this process and dispatches commands to their threads."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.bk = importlib.import_module("branchkey")
        self.client_module = importlib.import_module("branchkey.client")
        self.version = _dist_version("branchkey") or "unknown"
        self.observation = _Observation(self.bk, self.client_module)
        params = inspect.signature(self.bk.Client).parameters
        self.has_output_dir = "output_dir" in params
        self.transports = ["websocket"]
        if hasattr(self.bk, "RabbitMQConfig") and "rabbitmq_config" in params:
            self.transports.insert(0, "amqp")
        self.leaves: dict[str, _Leaf] = {}
        self._leaves_lock = threading.Lock()
        self._download_lock = threading.Lock()
        if not self.has_output_dir:
            self.observation.unobserved.append(
                {
                    "what": "parallel_downloads",
                    "why": "this release downloads into ./aggregated_output of the process; "
                    "the runner serialises downloads and moves each file to its leaf's folder",
                }
            )

    # ------------------------------------------------------------------ dispatch

    def ready(self) -> None:
        _OUT.emit(
            "ready",
            protocol=PROTOCOL_VERSION,
            pid=os.getpid(),
            python=sys.version.split()[0],
            branchkey=self.version,
            numpy=_dist_version("numpy"),
            requests=_dist_version("requests"),
            urllib3=_dist_version("urllib3"),
            transports=self.transports,
            observed=sorted(set(self.observation.observed)),
            unobserved=self.observation.unobserved,
        )

    def dispatch(self, command: dict[str, Any]) -> bool:
        """Route one command; False once ``shutdown`` was handled."""
        cmd = command.get("cmd")
        if cmd == "shutdown":
            self.shutdown(command)
            return False
        leaf_key = command.get("leaf")
        if not isinstance(leaf_key, str) or not leaf_key:
            _reply(command, ok=False, error="every command but shutdown needs a 'leaf'")
            return True
        with self._leaves_lock:
            leaf = self.leaves.get(leaf_key)
            if cmd == "start_leaf":
                if leaf is not None:
                    _reply(command, ok=False, error=f"leaf {leaf_key!r} is already started")
                    return True
                leaf = self._new_leaf(leaf_key)
            elif leaf is None:
                _reply(command, ok=False, error=f"leaf {leaf_key!r} is not started")
                return True
            leaf.commands.put(command)
        return True

    def _retire(self, leaf: _Leaf, why: str) -> None:
        """Forget a leaf (stopped, or its client could not be built) so its key can be
        started again; commands still queued for it are answered, not left hanging."""
        with self._leaves_lock:
            if self.leaves.get(leaf.key) is leaf:
                del self.leaves[leaf.key]
            while True:
                try:
                    pending = leaf.commands.get_nowait()
                except queue.Empty:
                    break
                if pending is not None:
                    _reply(pending, ok=False, error=f"leaf {leaf.key!r} {why}")

    def _new_leaf(self, key: str) -> _Leaf:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80] or "leaf"
        if safe != key:  # two keys must never share a folder ("a/b" and "a_b")
            safe += "-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
        leaf = _Leaf(key=key, workdir=os.path.join(self.workdir, "leaves", safe))
        os.makedirs(leaf.workdir, exist_ok=True)
        thread = threading.Thread(target=self._leaf_loop, args=(leaf,), name=f"leaf-{safe}")
        thread._bk_leaf = key  # type: ignore[attr-defined]
        thread.daemon = True
        leaf.thread = thread
        self.leaves[key] = leaf
        thread.start()
        return leaf

    def _leaf_loop(self, leaf: _Leaf) -> None:
        handlers: dict[str, Callable[[_Leaf, dict[str, Any]], dict[str, Any]]] = {
            "start_leaf": self._start_leaf,
            "upload": self._upload,
            "wait_notification": self._wait_notification,
            "download": self._download,
            "play_round": self._play_round,
            "status": self._status,
            "stop_leaf": self._stop_leaf,
        }
        while True:
            command = leaf.commands.get()
            if command is None:
                return
            handler = handlers.get(str(command.get("cmd")))
            started = time.monotonic()
            if handler is None:
                _reply(command, ok=False, error=f"unknown command {command.get('cmd')!r}")
                continue
            fields: dict[str, Any]
            try:
                fields = {"ok": True, "result": handler(leaf, command)}
            except CommandError as exc:
                fields = {"ok": False, "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - the client raises bare Exception
                fields = {
                    "ok": False,
                    "error": f"{exc}"[:2000],
                    "error_type": type(exc).__name__,
                    "stage": getattr(exc, "_bk_stage", None),
                }
            fields["duration_s"] = _since(started)
            # Retire before replying: the host may start the same key again at once.
            done = command.get("cmd") == "stop_leaf" or (
                command.get("cmd") == "start_leaf" and leaf.client is None
            )
            if done:
                self._retire(leaf, "was stopped" if leaf.stopping else "could not be started")
            _reply(command, **fields)
            if done:
                return

    # ------------------------------------------------------------------ commands

    def _start_leaf(self, leaf: _Leaf, command: dict[str, Any]) -> dict[str, Any]:
        bk = self.bk
        creds = command.get("credentials")
        if not isinstance(creds, dict) or any(k not in creds for k in CREDENTIAL_FIELDS):
            raise CommandError(f"credentials must hold {', '.join(CREDENTIAL_FIELDS)}")
        transport = command.get("transport", "amqp" if "amqp" in self.transports else "websocket")
        if transport not in ("amqp", "websocket"):
            raise CommandError(f"unknown transport {transport!r}: amqp or websocket")
        if transport not in self.transports:
            raise CommandError(
                f"transport {transport!r} is not available in branchkey=={self.version}: "
                f"it has {', '.join(self.transports)} only"
            )
        kwargs: dict[str, Any] = {}
        kwargs["api_config"] = _config(bk, "APIConfig", command.get("api") or {}, "api")
        for key, cls_name, arg in (
            ("retry", "RetryConfig", "retry_config"),
            ("run", "RunConfig", "run_config"),
            ("websocket", "WebSocketConfig", "websocket_config"),
        ):
            if command.get(key):
                kwargs[arg] = _config(bk, cls_name, command[key], key)
        params = inspect.signature(bk.Client).parameters
        if transport == "amqp":
            kwargs["rabbitmq_config"] = _config(
                bk, "RabbitMQConfig", command.get("rabbitmq") or {}, "rabbitmq"
            )
            kwargs["use_websocket"] = False
        elif "amqp" in self.transports and "use_websocket" in params:
            kwargs["use_websocket"] = True
        if self.has_output_dir:
            kwargs["output_dir"] = os.path.join(leaf.workdir, "aggregated_output")
        credentials = bk.Credentials(**{k: str(creds[k]) for k in CREDENTIAL_FIELDS})
        started = time.monotonic()
        leaf.client = bk.Client(credentials, **kwargs)
        held = getattr(leaf.client, "queue", None)
        if not self.observation.queue_patched and isinstance(held, queue.Queue):
            held.__class__ = _observed_queue_class(type(held))  # same layout: a subclass
        self._watch_consumer(leaf)
        return {
            "transport": transport,
            "construct_s": _since(started),
            "run_status": leaf.client.run_status,
            "run_number": leaf.client.run_number,
        }

    def _watch_consumer(self, leaf: _Leaf) -> None:
        consumer = getattr(leaf.client, "consumer", None)
        if not isinstance(consumer, threading.Thread):
            _OUT.emit("consumer_stopped", leaf.key, reason="no consumer thread after construction")
            return

        def watch() -> None:
            while consumer.is_alive() and not leaf.stopping:
                time.sleep(_CONSUMER_POLL_S)
            if not leaf.stopping:
                _OUT.emit("consumer_stopped", leaf.key, reason="consumer thread ended")

        watcher = threading.Thread(target=watch, name=f"watch-{leaf.key}", daemon=True)
        watcher.start()

    def _upload(self, leaf: _Leaf, command: dict[str, Any]) -> dict[str, Any]:
        path = _need_path(command)
        file_id = _client(leaf).file_upload(path)
        return {"file_id": str(file_id), "bytes": os.path.getsize(path)}

    def _wait_notification(self, leaf: _Leaf, command: dict[str, Any]) -> dict[str, Any]:
        timeout = float(command.get("wait_s", 60))
        started = time.monotonic()
        _set_thread_attr("_bk_role", "taker")
        try:
            aggregation_id = _client(leaf).queue.get(timeout=timeout)
        except queue.Empty:
            raise CommandError(f"no aggregation notification within {timeout:g} s") from None
        finally:
            _set_thread_attr("_bk_role", None)
        return {"aggregation_id": str(aggregation_id), "waited_s": _since(started)}

    def _download(self, leaf: _Leaf, command: dict[str, Any]) -> dict[str, Any]:
        file_id = command.get("file_id")
        if not isinstance(file_id, str) or not file_id:
            raise CommandError("download needs a 'file_id'")
        client = _client(leaf)
        target_dir = os.path.join(leaf.workdir, "aggregated_output")
        if self.has_output_dir:
            path = str(client.file_download(file_id))
        else:
            with self._download_lock:
                got = str(client.file_download(file_id))
                os.makedirs(target_dir, exist_ok=True)
                path = os.path.join(target_dir, os.path.basename(got))
                os.replace(got, path)
        path = os.path.abspath(path)
        return {"file_id": file_id, "path": path, "bytes": os.path.getsize(path)}

    def _play_round(self, leaf: _Leaf, command: dict[str, Any]) -> dict[str, Any]:
        """Upload, wait for the aggregation notification, download: one reply."""
        out: dict[str, Any] = {}
        steps: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
            ("upload", lambda: self._upload(leaf, command)),
            ("wait_notification", lambda: self._wait_notification(leaf, command)),
        )
        for stage, step in steps:
            try:
                out[stage] = step()
            except Exception as exc:
                exc._bk_stage = stage  # type: ignore[attr-defined]
                raise
        aggregation_id = out["wait_notification"]["aggregation_id"]
        try:
            out["download"] = self._download(leaf, {"file_id": aggregation_id})
        except Exception as exc:
            exc._bk_stage = "download"  # type: ignore[attr-defined]
            raise
        return out

    def _status(self, leaf: _Leaf, command: dict[str, Any]) -> dict[str, Any]:
        client = _client(leaf)
        consumer = getattr(client, "consumer", None)
        return {
            "run_status": client.run_status,
            "run_number": client.run_number,
            "consumer_alive": bool(consumer is not None and consumer.is_alive()),
            "queue_size": client.queue.qsize(),
        }

    def _stop_leaf(self, leaf: _Leaf, command: dict[str, Any]) -> dict[str, Any]:
        leaf.stopping = True
        if leaf.client is None:
            return {"closed": False}
        _set_thread_attr("_bk_role", "close")
        try:
            leaf.client.close()
        finally:
            _set_thread_attr("_bk_role", None)
        consumer = getattr(leaf.client, "consumer", None)
        return {"closed": True, "consumer_alive": bool(consumer and consumer.is_alive())}

    def shutdown(self, command: dict[str, Any]) -> None:
        """Close every leaf (in parallel, bounded), reply, say ``bye``."""
        closers = []
        with self._leaves_lock:
            current = list(self.leaves.values())
        for leaf in current:
            if leaf.thread is not None and leaf.thread.is_alive():
                leaf.commands.put({"cmd": "stop_leaf", "leaf": leaf.key, "id": None})
                closers.append(leaf.thread)
        deadline = time.monotonic() + _SHUTDOWN_CLOSE_S
        for thread in closers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in closers if t.is_alive()]
        _reply(command, ok=not stuck, result={"stuck": stuck}, error=None)
        _OUT.emit("bye", stuck=stuck)


def _reply(command: dict[str, Any], *, ok: bool, **fields: Any) -> None:
    fields.setdefault("result", None)
    fields.setdefault("error", None)
    _OUT.emit(
        "reply",
        command.get("leaf") if isinstance(command.get("leaf"), str) else None,
        id=command.get("id"),
        cmd=command.get("cmd"),
        ok=ok,
        **fields,
    )


def _client(leaf: _Leaf) -> Any:
    if leaf.client is None:
        raise CommandError(f"leaf {leaf.key!r} has no client (start_leaf failed)")
    return leaf.client


def _need_path(command: dict[str, Any]) -> str:
    path = command.get("path")
    if not isinstance(path, str) or not os.path.isfile(path):
        raise CommandError(f"upload needs an existing file 'path', got {path!r}")
    return path


def _config(bk: Any, cls_name: str, values: Any, where: str) -> Any:
    cls = getattr(bk, cls_name, None)
    if cls is None:
        raise CommandError(f"{where}: this branchkey release has no {cls_name}")
    if not isinstance(values, dict):
        raise CommandError(f"{where} must be an object of {cls_name} fields")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise CommandError(
            f"{where}: {', '.join(unknown)} not a field of {cls_name} in this release "
            f"(fields: {', '.join(sorted(fields))})"
        )
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**clean)


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _since(started: float) -> float:
    return round(time.monotonic() - started, 6)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global _OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    # The protocol owns the original stdout; fd 1 and sys.stdout go elsewhere so that no
    # print (ours, the package's, a C library's) can corrupt it.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    _OUT = _Emitter(protocol)
    sys.stdout = _PrintBridge()
    os.makedirs(args.workdir, exist_ok=True)
    os.chdir(args.workdir)
    try:
        runner = Runner(os.path.abspath(args.workdir))
    except Exception as exc:  # noqa: BLE001 - import of the package failed: say so, exit
        _OUT.emit("fatal", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        return 3
    runner.ready()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            if not isinstance(command, dict):
                raise ValueError("a command is a JSON object")
        except ValueError as exc:
            _OUT.emit("reply", id=None, cmd=None, ok=False, result=None, error=f"bad line: {exc}")
            continue
        if not runner.dispatch(command):
            break
    else:
        runner.shutdown({"cmd": "shutdown", "id": None})
    protocol.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # consumer threads of the package must not keep the process alive
