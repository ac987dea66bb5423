"""The WebSocket notification consumer of the leaf client (PROTOCOL.md 4 and 4b).

One asyncio loop in one daemon thread runs the whole life: fetch a ticket, connect to
``<url>?ticket=<ticket_id>&request_id=<request_id>``, read one JSON notification per
frame, and on any loss wait ``reconnect_delay(n, ...)`` and start over with a fresh
ticket (a ticket is good for one connect only). ``close()`` cancels the loop's one task,
which interrupts whatever it is doing (a backoff sleep, the opening handshake, a read);
the connection then sends a close frame bounded by ``CLOSE_TIMEOUT_S``.

The server pings and ``websockets`` answers; the client never pings (``ping_interval``
None), as the contract says. ``get_ticket`` (a blocking HTTP call) and ``on_message`` run
on daemon threads, one call at a time, so a slow handler never stalls the loop that
answers the server's pings, while messages are still handled one at a time, in order.
Daemon threads, not a ``ThreadPoolExecutor``: the interpreter joins an executor's workers
at exit, so a ticket request hanging on a black-holed platform kept the process alive for
the whole HTTP timeout after ``close()``. The attempt counting is the AMQP consumer's:
attempt 0 is the first connect, the counter resets once connected, ``give_up`` after
``max_reconnect_attempts`` failed reconnects (0 = never).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)

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


class _ConnectFailed(Exception):
    """One connect attempt failed; the text goes into the ``connect_failed`` event."""


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


async def _in_daemon_thread(fn: Callable[[], _T], name: str) -> _T:
    """``fn()`` on a new daemon thread; cancelling the await abandons the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return  # the awaiting task was cancelled (close)
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def run() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: the consumer stopped meanwhile

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def _describe_close(exc: ConnectionClosed) -> str:
    """Why a connected socket ended, from the close frame received (if any)."""
    if exc.rcvd is not None:
        return f"server closed the connection (code {exc.rcvd.code} {exc.rcvd.reason!r})"
    return "connection lost without a close frame"


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_alive = False
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._gave_up = False

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
            self._loop = asyncio.new_event_loop()
            self._loop_alive = True
            self._thread = threading.Thread(target=self._run, name="bk-websocket", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop receiving and close the socket; waits at most ``timeout`` seconds."""
        with self._lock:
            self._stopping.set()
            thread = self._thread
            if self._loop_alive and self._loop is not None:
                self._loop.call_soon_threadsafe(self._cancel)
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

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            self._task = loop.create_task(self._main())
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - a bug must end the thread loudly, not hang
            _log.exception("WebSocket consumer crashed")
            self._gave_up = True
            self._events.emit("give_up", transport=TRANSPORT, error=f"consumer crashed: {exc}")
        finally:
            with self._lock:
                self._loop_alive = False
            self._connected = False
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
            if self._stopping.is_set() and not self._gave_up:
                self._events.emit("consumer_stopped", transport=TRANSPORT)

    async def _main(self) -> None:
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
                    self._gave_up = True
                    self._events.emit(
                        "give_up", transport=TRANSPORT, attempt=attempt - 1, error=last_error
                    )
                    return
                delay = reconnect_delay(
                    attempt, cfg.reconnect_backoff_factor, cfg.reconnect_max_delay
                )
                self._events.emit(
                    "reconnect_wait", transport=TRANSPORT, attempt=attempt, delay_s=delay
                )
                await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                ws = await self._open()
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
            up_since = time.monotonic()
            self._connected = True
            _log.info("WebSocket consumer connected (attempt %d)", attempt)
            self._events.emit(
                "connect", transport=TRANSPORT, attempt=attempt, duration_s=up_since - started
            )
            try:
                last_error = await self._consume(ws)
            finally:
                self._connected = False
                await ws.close()
            _log.warning("WebSocket consumer disconnected: %s", last_error)
            self._events.emit(
                "disconnect",
                transport=TRANSPORT,
                error=last_error,
                duration_s=time.monotonic() - up_since,
            )
            attempt = 1

    async def _open(self) -> ClientConnection:
        """Fetch a fresh ticket and open the socket, or raise ``_ConnectFailed``."""
        try:
            ticket = await _in_daemon_thread(self._get_ticket, "bk-ws-ticket")
        except Exception as exc:  # noqa: BLE001 - get_ticket raises ClientError, or worse
            raise _ConnectFailed(f"ticket request failed: {_short(exc)}") from exc
        ticket_id, request_id = self._ticket_fields(ticket)
        sep = "&" if "?" in self._url else "?"
        query = f"ticket={quote(ticket_id, safe='')}&request_id={quote(request_id, safe='')}"
        uri = f"{self._url}{sep}{query}"
        try:
            return await connect(
                uri,
                ssl=self._ssl,
                open_timeout=self._config.open_timeout,
                ping_interval=None,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=MAX_MESSAGE_BYTES,
            )
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

    async def _consume(self, ws: ClientConnection) -> str:
        """Hand each frame to the handler, in order; return why the socket ended."""
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as exc:
                return _describe_close(exc)
            await _in_daemon_thread(functools.partial(self._handle, frame), "bk-ws-handler")

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
