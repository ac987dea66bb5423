"""A gevent-friendly WebSocket notification consumer for Locust users (PROTOCOL.md 4b).

Why not the client's own ``WebSocketConsumer``: it runs one asyncio event loop per
consumer thread. Under gevent's monkey-patching those "threads" are greenlets of one OS
thread, and asyncio allows one running loop per OS thread, so every consumer after the
first crashes ("Cannot run the event loop while another loop is running"). This one does
the same job with ``websockets.sync`` (blocking sockets and threads, which gevent makes
cooperative): a fresh ticket per connect, one JSON notification per text frame handed to
the client's handler in order, no client pings, and the client's reconnect rule and events
(``connect``, ``connect_failed``, ``disconnect``, ``reconnect_wait``, ``give_up``,
``consumer_stopped``), so Locust's table reads the same for both transports.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from bk_sim.client import EventSink, WebSocketConfig, attempts_left, reconnect_delay

_log = logging.getLogger(__name__)

TRANSPORT = "websocket"
CLOSE_TIMEOUT_S = 1.0
MAX_MESSAGE_BYTES = 1 << 20


class _ConnectFailed(Exception):
    """One connect attempt failed; the text goes into the ``connect_failed`` event."""


class GeventWebSocketConsumer:
    """Receives a leaf's notifications over the platform's WebSocket, as a greenlet."""

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
        self._ssl: ssl.SSLContext | None = None
        if url.startswith("wss://"):
            self._ssl = ssl.create_default_context()
            if not verify_ssl:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ws: ClientConnection | None = None
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        if self._thread is not None or self._stopping.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="bk-ws-gevent", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - closing must not fail
                _log.debug("closing the WebSocket failed", exc_info=True)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        cfg = self._config
        attempt = 0
        last_error: str | None = None
        try:
            while not self._stopping.is_set():
                if attempt > 0:
                    if not attempts_left(attempt, cfg.max_reconnect_attempts):
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
                    if self._stopping.wait(delay):
                        break
                started = time.monotonic()
                try:
                    ws = self._open()
                except _ConnectFailed as exc:
                    last_error = str(exc)
                    self._events.emit(
                        "connect_failed",
                        transport=TRANSPORT,
                        attempt=attempt,
                        error=last_error,
                        duration_s=time.monotonic() - started,
                    )
                    attempt += 1
                    continue
                self._ws = ws
                if self._stopping.is_set():
                    ws.close()
                    break
                up_since = time.monotonic()
                self._connected = True
                self._events.emit(
                    "connect", transport=TRANSPORT, attempt=attempt, duration_s=up_since - started
                )
                last_error = self._consume(ws)
                self._connected = False
                self._ws = None
                if self._stopping.is_set():
                    break
                self._events.emit(
                    "disconnect",
                    transport=TRANSPORT,
                    error=last_error,
                    duration_s=time.monotonic() - up_since,
                )
                attempt = 1
        except Exception as exc:  # noqa: BLE001 - a bug must end the consumer loudly
            _log.exception("WebSocket consumer crashed")
            self._events.emit("give_up", transport=TRANSPORT, error=f"consumer crashed: {exc}")
            return
        self._events.emit("consumer_stopped", transport=TRANSPORT)

    def _open(self) -> ClientConnection:
        try:
            ticket = self._get_ticket()
        except Exception as exc:  # noqa: BLE001 - get_ticket raises ClientError, or worse
            raise _ConnectFailed(f"ticket request failed: {exc}") from exc
        if not isinstance(ticket, Mapping):
            raise _ConnectFailed("ticket response is not an object")
        ticket_id, request_id = ticket.get("ticket_id"), ticket.get("request_id")
        if not isinstance(ticket_id, str) or not isinstance(request_id, str):
            raise _ConnectFailed("ticket response has no ticket_id / request_id")
        sep = "&" if "?" in self._url else "?"
        uri = (
            f"{self._url}{sep}ticket={quote(ticket_id, safe='')}"
            f"&request_id={quote(request_id, safe='')}"
        )
        try:
            return connect(
                uri,
                ssl=self._ssl,
                open_timeout=self._config.open_timeout,
                ping_interval=None,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=MAX_MESSAGE_BYTES,
            )
        except InvalidStatus as exc:
            raise _ConnectFailed(f"handshake refused with HTTP {exc.response.status_code}") from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise _ConnectFailed(f"cannot connect: {type(exc).__name__}: {exc}") from exc

    def _consume(self, ws: ClientConnection) -> str:
        """Hand each frame to the handler, in order; return why the socket ended."""
        while True:
            try:
                frame = ws.recv()
            except ConnectionClosed as exc:
                if exc.rcvd is not None:
                    return f"server closed the connection (code {exc.rcvd.code})"
                return "connection lost without a close frame"
            try:
                message = json.loads(frame)
            except ValueError:
                _log.warning("dropping a notification that is not JSON: %r", frame[:200])
                continue
            if isinstance(message, dict):
                self._on_message(message)
