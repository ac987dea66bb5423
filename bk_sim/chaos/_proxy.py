"""A TCP proxy with Toxiproxy-style toxics, for the network between leaves and the broker.

Why our own and not Toxiproxy: it is one asyncio loop in a daemon thread of the harness,
needs no binary and no HTTP control port, and the orchestrator thread drives it with plain
method calls. Toxics act on both directions of every connection:

* ``latency``: each chunk is delivered ``latency_s`` (plus uniform jitter up to
  ``jitter_s``) after it arrived, order kept;
* ``bandwidth``: each direction of each connection is paced to ``bytes_per_s``;
* ``blackhole``: a stall. Bytes are read and swallowed, nothing is forwarded, sockets stay
  open (new connections are accepted and stall too), and a close from either side is held
  back, so a peer can only notice through its own timers (AMQP heartbeats). When the stall
  ends, connections that lost bytes are closed: their streams are corrupt;
* ``reset_all``: every open connection is closed with RST (``SO_LINGER`` 0), both sides;
* ``slow_close``: when one side closes, the other side is closed ``delay_s`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bk_sim.errors import BkSimError

_log = logging.getLogger(__name__)

_READ_CHUNK = 65536
_PACE_SLICES_PER_S = 50  # bandwidth pacing granularity
_CONTROL_TIMEOUT_S = 10.0
T = TypeVar("T")


class ProxyError(BkSimError):
    """The chaos proxy could not start or be controlled."""


@dataclass
class ToxicState:
    """The toxics in force; read by the proxy loop, written through ``ToxicProxy``."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    bytes_per_s: float | None = None
    blackhole: bool = False
    slow_close_s: float = 0.0


@dataclass
class _Conn:
    cid: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    swallowed: bool = False
    closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class ToxicProxy:
    """``ToxicProxy(upstream_host, upstream_port).start()`` -> (host, port) to connect to."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listen = (listen_host, listen_port)
        self.toxics = ToxicState()
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._flowing: asyncio.Event | None = None  # set when no blackhole is in force
        self.address: tuple[str, int] | None = None
        self.accepted = 0
        self.bytes_forwarded = 0
        self.bytes_swallowed = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> tuple[str, int]:
        """Listen and return ``(host, port)``; the proxy runs in a daemon thread."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except OSError as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close_all())
                loop.close()

        self._thread = threading.Thread(target=run, name="bk-sim-chaos-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(_CONTROL_TIMEOUT_S) or failure:
            raise ProxyError(
                f"chaos proxy could not listen on {self._listen[0]}:{self._listen[1]}: "
                f"{failure[0] if failure else 'timed out'}"
            )
        assert self.address is not None
        _log.info("chaos proxy %s:%d -> %s:%d", *self.address, *self.upstream)
        return self.address

    def stop(self) -> None:
        """Close the listener and every connection; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CONTROL_TIMEOUT_S)

    def __enter__(self) -> ToxicProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self._conns.values() if not c.closed)

    # ------------------------------------------------------------------ toxics

    def set_latency(self, latency_s: float, jitter_s: float = 0.0) -> None:
        self.toxics.latency_s = max(0.0, latency_s)
        self.toxics.jitter_s = max(0.0, jitter_s)

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ProxyError(f"bandwidth must be > 0 bytes/s, got {bytes_per_s}")
        self.toxics.bytes_per_s = bytes_per_s

    def set_slow_close(self, delay_s: float) -> None:
        self.toxics.slow_close_s = max(0.0, delay_s)

    def set_blackhole(self, on: bool) -> None:
        """Start or end a stall; ending it closes the connections that lost bytes."""
        self._call(self._set_blackhole(on))

    def reset_all(self) -> int:
        """RST every open connection (both sides); returns how many were reset."""
        return self._call(self._reset_all())

    def clear(self) -> None:
        """Remove every toxic (ending a blackhole as ``set_blackhole(False)`` does)."""
        self.set_blackhole(False)
        self.toxics.latency_s = self.toxics.jitter_s = self.toxics.slow_close_s = 0.0
        self.toxics.bytes_per_s = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None or not loop.is_running():
            coro.close()
            raise ProxyError("the chaos proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_CONTROL_TIMEOUT_S)

    # ------------------------------------------------------------------ the loop

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, *self._listen)
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            self._abort(conn, rst=False)
        tasks = [t for c in self._conns.values() for t in c.tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _set_blackhole(self, on: bool) -> None:
        assert self._flowing is not None
        self.toxics.blackhole = on
        if on:
            self._flowing.clear()
            return
        self._flowing.set()
        for conn in list(self._conns.values()):
            if conn.swallowed and not conn.closed:
                self._abort(conn, rst=False)

    async def _reset_all(self) -> int:
        n = 0
        for conn in list(self._conns.values()):
            if not conn.closed:
                self._abort(conn, rst=True)
                n += 1
        return n

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        self.accepted += 1
        conn = _Conn(self._next_id, writer)
        self._conns[conn.cid] = conn
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            _log.info("chaos proxy: upstream %s:%d refused: %s", *self.upstream, exc)
            self._abort(conn, rst=True)
            self._conns.pop(conn.cid, None)
            return
        conn.upstream = up_writer
        conn.tasks = [
            asyncio.create_task(self._pipe(conn, reader, up_writer)),
            asyncio.create_task(self._pipe(conn, up_reader, writer)),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._abort(conn, rst=False)
            self._conns.pop(conn.cid, None)

    async def _pipe(
        self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        """One direction: read, apply toxics, deliver in order; a close ends both sides."""
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        writer = asyncio.create_task(self._deliver(conn, pending, dst))
        last_due = 0.0
        try:
            while not conn.closed:
                try:
                    data = await src.read(_READ_CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                if self.toxics.blackhole:
                    conn.swallowed = True
                    self.bytes_swallowed += len(data)
                    continue
                t = self.toxics
                delay = t.latency_s + (self._rng.uniform(0.0, t.jitter_s) if t.jitter_s else 0.0)
                due = max(loop.time() + delay, last_due)
                last_due = due
                pending.put_nowait((due, data))
        finally:
            try:
                if conn.closed:
                    writer.cancel()
                else:
                    # A close seen during a stall is held back until the stall ends.
                    await self._flowing.wait()
                    pending.put_nowait(None)
            finally:
                if conn.closed:
                    writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

    async def _deliver(
        self,
        conn: _Conn,
        pending: asyncio.Queue[tuple[float, bytes] | None],
        dst: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await pending.get()
                if item is None:
                    break
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._paced_write(dst, data)
                self.bytes_forwarded += len(data)
        except (ConnectionError, OSError):
            pass
        if self.toxics.slow_close_s > 0 and not conn.closed:
            await asyncio.sleep(self.toxics.slow_close_s)
        self._abort(conn, rst=False)

    async def _paced_write(self, dst: asyncio.StreamWriter, data: bytes) -> None:
        rate = self.toxics.bytes_per_s
        if rate is None:
            dst.write(data)
            await dst.drain()
            return
        step = max(1, int(rate / _PACE_SLICES_PER_S))
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            sent += len(piece)
            dst.write(piece)
            await dst.drain()
            ahead = start + sent / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)

    def _abort(self, conn: _Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        for w in (conn.client, conn.upstream):
            if w is None:
                continue
            if rst:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                w.transport.abort()
            else:
                w.close()
        for t in conn.tasks:
            if t is not asyncio.current_task() and not t.done():
                t.cancel()
