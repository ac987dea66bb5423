"""The WebSocket notification consumer of the leaf client (PROTOCOL.md 4 and 4b).

One implementation for threads and for gevent: blocking sockets (``websockets.sync``)
in a daemon thread, which gevent's monkey-patching turns into a greenlet. (An asyncio
loop per consumer cannot serve gevent: greenlets share one OS thread, and asyncio allows
one running loop per OS thread.)

The life of the consumer thread: fetch a ticket, connect to
``<url>?ticket=<ticket_id>&request_id=<request_id>``, hand each JSON notification to
``on_message`` in order, and on any loss wait ``reconnect_delay(n, ...)`` and start over
with a fresh ticket (a ticket is good for one connect only). The server pings and the
``websockets`` receiver thread answers, so a slow handler never starves the pongs; the
client never pings (``ping_interval`` None), as the contract says.

``close()`` is prompt wherever the thread is: a backoff wait is an ``Event`` wait; the
ticket call and the opening handshake run on helper daemon threads that ``close()``
abandons (a late connection is closed as it arrives), so a hanging ticket request to a
black-holed platform neither delays ``close()`` nor keeps the process alive; an open
socket gets a close frame bounded by ``CLOSE_TIMEOUT_S``. Attempt counting is the AMQP
consumer's: attempt 0 is the first connect, the counter resets once connected,
``give_up`` after ``max_reconnect_attempts`` failed reconnects (0 = never).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)
from websockets.sync.client import ClientConnection, connect

from bk_sim.client._backoff import attempts_left, reconnect_delay
from bk_sim.client._config import WebSocketConfig
from bk_sim.client._events import EventSink
from bk_sim.client._http import JSON_ERRORS

_log = logging.getLogger("bk_sim.client.websocket")
_T = TypeVar("_T")

TRANSPORT = "websocket"
#: How long a close handshake may take before the socket is simply dropped.
CLOSE_TIMEOUT_S = 1.0
#: Largest notification frame accepted; notifications are a few hundred bytes.
MAX_MESSAGE_BYTES = 1 << 20
#: websockets >= 17.1 wants ``legacy=True`` to hand back a connection outside ``with``.
_DIRECT: dict[str, Any] = (
    {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
)


class _ConnectFailed(Exception):
    """One connect attempt failed; the text goes into the ``connect_failed`` event."""


class _Stopped(Exception):
    """``close()`` was called while the consumer thread waited for a helper."""


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _describe_close(exc: ConnectionClosed) -> str:
    """Why a connected socket ended, from the close frame received (if any)."""
    if exc.rcvd is not None:
        return f"server closed the connection (code {exc.rcvd.code} {exc.rcvd.reason!r})"
    return "connection lost without a close frame"


class _Call(Generic[_T]):
    """One blocking call on a helper daemon thread, which the consumer may abandon."""

    def __init__(self, fn: Callable[[], _T], on_late: Callable[[_T], None] | None) -> None:
        self.done = threading.Event()
        self._fn = fn
        self._on_late = on_late
        self._lock = threading.Lock()
        self._abandoned = False
        self._result: _T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting consumer
            error = exc
        with self._lock:
            self._result, self._error = result, error
            late = self._abandoned
        self.done.set()
        if late and result is not None and self._on_late is not None:
            self._on_late(result)  # e.g. close a socket opened after close()

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
        self.done.set()

    def outcome(self) -> _T:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._abandoned:
                raise _Stopped()
            assert self._result is not None
            return self._result


class WebSocketConsumer:
    """Receives the leaf's notifications over the platform's WebSocket.

    ``start()`` returns at once; ``close()`` is prompt and idempotent from any thread,
    including from inside ``on_message``.
    """

    def __init__(
        self,
        url: str,
        config: WebSocketConfig,
        get_ticket: Callable[[], dict[str, Any]],
        on_message: Callable[[dict[str, Any]], None],
        events: EventSink,
        verify_ssl: bool = True,
    ) -> None:
        self._url = url
        self._config = config
        self._get_ticket = get_ticket
        self._on_message = on_message
        self._events = events
        self._ssl = self._ssl_context(url, verify_ssl)

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: _Call[Any] | None = None
        self._ws: ClientConnection | None = None
        self._connected = False

    # -- public surface
    @property
    def connected(self) -> bool:
        """True while a WebSocket to the platform is open."""
        return self._connected

    def start(self) -> None:
        """Start the consumer thread; a second call, or a call after ``close()``, does nothing."""
        with self._lock:
            if self._thread is not None or self._stopping.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="bk-websocket", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop receiving and close the socket; waits at most ``timeout`` seconds."""
        with self._lock:
            self._stopping.set()
            thread, pending, ws = self._thread, self._pending, self._ws
        if pending is not None:
            pending.abandon()
        if ws is not None:
            self._close_socket(ws)
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            _log.warning("WebSocket consumer did not stop within %.1f s", timeout)

    # -- the consumer thread
    @staticmethod
    def _ssl_context(url: str, verify: bool) -> ssl.SSLContext | None:
        if not url.startswith("wss://"):
            return None
        ctx = ssl.create_default_context()
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    @staticmethod
    def _close_socket(ws: ClientConnection) -> None:
        try:
            ws.close()
        except Exception:  # noqa: BLE001 - closing must not fail
            _log.debug("closing the WebSocket failed", exc_info=True)

    def _helper(
        self, fn: Callable[[], _T], name: str, on_late: Callable[[_T], None] | None = None
    ) -> _T:
        """``fn()`` on a daemon thread; ``_Stopped`` at once if ``close()`` comes first."""
        call: _Call[_T] = _Call(fn, on_late)
        with self._lock:
            if self._stopping.is_set():
                raise _Stopped()
            self._pending = call
        try:
            threading.Thread(target=call.run, name=name, daemon=True).start()
            call.done.wait()
            return call.outcome()
        finally:
            with self._lock:
                self._pending = None

    def _run(self) -> None:
        gave_up = False
        try:
            gave_up = self._loop()
        except _Stopped:
            pass
        except Exception as exc:  # noqa: BLE001 - a bug must end the thread loudly, not hang
            _log.exception("WebSocket consumer crashed")
            gave_up = True
            self._events.emit("give_up", transport=TRANSPORT, error=f"consumer crashed: {exc}")
        finally:
            self._connected = False
            with self._lock:
                self._ws = None
        if self._stopping.is_set() and not gave_up:
            self._events.emit("consumer_stopped", transport=TRANSPORT)

    def _loop(self) -> bool:
        """Connect, consume, reconnect until closed; True when it gave up."""
        cfg = self._config
        attempt = 0
        last_error: str | None = None
        while not self._stopping.is_set():
            if attempt > 0:
                if not attempts_left(attempt, cfg.max_reconnect_attempts):
                    _log.error(
                        "WebSocket consumer gives up after %d reconnect attempts: %s",
                        attempt - 1,
                        last_error,
                    )
                    self._events.emit(
                        "give_up", transport=TRANSPORT, attempt=attempt - 1, error=last_error
                    )
                    return True
                delay = reconnect_delay(
                    attempt, cfg.reconnect_backoff_factor, cfg.reconnect_max_delay
                )
                self._events.emit(
                    "reconnect_wait", transport=TRANSPORT, attempt=attempt, delay_s=delay
                )
                if self._stopping.wait(delay):
                    break
            started = time.monotonic()
            try:
                ws = self._open()
            except _ConnectFailed as exc:
                last_error = str(exc)
                _log.warning("WebSocket connect attempt %d failed: %s", attempt, last_error)
                self._events.emit(
                    "connect_failed",
                    transport=TRANSPORT,
                    attempt=attempt,
                    error=last_error,
                    duration_s=time.monotonic() - started,
                )
                attempt += 1
                continue
            with self._lock:
                if self._stopping.is_set():
                    stop_now = True
                else:
                    stop_now = False
                    self._ws = ws
            if stop_now:
                self._close_socket(ws)
                break
            up_since = time.monotonic()
            self._connected = True
            _log.info("WebSocket consumer connected (attempt %d)", attempt)
            self._events.emit(
                "connect", transport=TRANSPORT, attempt=attempt, duration_s=up_since - started
            )
            try:
                last_error = self._consume(ws)
            finally:
                self._connected = False
                with self._lock:
                    self._ws = None
                self._close_socket(ws)
            if self._stopping.is_set():
                break
            _log.warning("WebSocket consumer disconnected: %s", last_error)
            self._events.emit(
                "disconnect",
                transport=TRANSPORT,
                error=last_error,
                duration_s=time.monotonic() - up_since,
            )
            attempt = 1
        return False

    def _open(self) -> ClientConnection:
        """Fetch a fresh ticket and open the socket, or raise ``_ConnectFailed``."""
        try:
            ticket = self._helper(self._get_ticket, "bk-ws-ticket")
        except _Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - get_ticket raises ClientError, or worse
            raise _ConnectFailed(f"ticket request failed: {_short(exc)}") from exc
        ticket_id, request_id = self._ticket_fields(ticket)
        sep = "&" if "?" in self._url else "?"
        query = f"ticket={quote(ticket_id, safe='')}&request_id={quote(request_id, safe='')}"
        uri = f"{self._url}{sep}{query}"
        try:
            return self._helper(
                functools.partial(self._connect, uri), "bk-ws-connect", on_late=self._close_socket
            )
        except _Stopped:
            raise
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = " (ticket refused)" if status in (401, 403) else ""
            raise _ConnectFailed(f"handshake refused with HTTP {status}{hint}") from exc
        except TimeoutError as exc:
            raise _ConnectFailed(
                f"opening handshake timed out after {self._config.open_timeout} s"
            ) from exc
        except OSError as exc:
            raise _ConnectFailed(f"cannot connect: {type(exc).__name__}: {_short(exc)}") from exc
        except (InvalidURI, InvalidHandshake, WebSocketException) as exc:
            raise _ConnectFailed(f"handshake failed: {type(exc).__name__}: {_short(exc)}") from exc

    def _connect(self, uri: str) -> ClientConnection:
        ws: ClientConnection = connect(
            uri,
            ssl=self._ssl,
            open_timeout=self._config.open_timeout,
            ping_interval=None,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=MAX_MESSAGE_BYTES,
            **_DIRECT,
        )
        return ws

    @staticmethod
    def _ticket_fields(ticket: Any) -> tuple[str, str]:
        if not isinstance(ticket, Mapping):
            raise _ConnectFailed(f"ticket response is not an object: {type(ticket).__name__}")
        ticket_id, request_id = ticket.get("ticket_id"), ticket.get("request_id")
        if not isinstance(ticket_id, str) or not ticket_id:
            raise _ConnectFailed("ticket response has no ticket_id")
        if not isinstance(request_id, str) or not request_id:
            raise _ConnectFailed("ticket response has no request_id")
        return ticket_id, request_id

    def _consume(self, ws: ClientConnection) -> str:
        """Hand each frame to the handler, in order; return why the socket ended."""
        while True:
            try:
                frame = ws.recv()
            except ConnectionClosed as exc:
                return _describe_close(exc)
            self._handle(frame)
            if self._stopping.is_set():
                return "closed by the client"

    def _handle(self, frame: str | bytes) -> None:
        """Parse one frame and call ``on_message``; bad frames and handler errors are logged."""
        try:
            message = json.loads(frame)
        except JSON_ERRORS:
            _log.warning("dropping a notification that is not JSON: %r", frame[:200])
            return
        if not isinstance(message, dict):
            _log.warning("dropping a notification that is not a JSON object: %r", frame[:200])
            return
        try:
            self._on_message(message)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the consumer
            _log.exception("notification handler failed")
