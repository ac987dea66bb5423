"""Time and count limits on connections, beneath aiohttp.

aiohttp closes idle keep-alive connections, but waits for ever for a request's headers
or a stalled body, so a slowloris client holds a connection (and a file descriptor) as
long as it likes. ``GuardedSite`` listens like ``web.TCPSite`` but wraps each aiohttp
protocol in ``_Guarded``, which notes when bytes arrive; the platform's middleware tells
the guard when a request's headers are parsed and when it is answered. A watchdog then
closes:

- a connection whose request headers are not complete ``header_timeout_s`` after its
  first byte (or after it opened / its previous answer, when it sends nothing); each
  connection's deadline is drawn between 75 % and 100 % of it, so that slow connections
  opened together are not all closed (and reopened) in the same instant;
- a keep-alive connection idle for ``keepalive_timeout_s``;
- a connection whose request body has not moved for ``body_timeout_s`` while the
  platform waits for it (not while the platform itself pauses reading).

At ``max_connections`` a new connection replaces the one that has waited longest for its
headers; when every connection is busy with a request the new one is closed at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from bk_sim.platform._limits import Limits

log = logging.getLogger(__name__)

_CLOSE_BATCH = 25
_IDLE, _HEADERS, _BUSY = 0, 1, 2  # between requests (no byte yet) / reading headers / handling


class _Guarded(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol and records activity for the watchdog."""

    __slots__ = (
        "_guard",
        "_inner",
        "transport",
        "state",
        "since",
        "last_data",
        "request",
        "fresh",
        "spread",
    )

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.since = time.monotonic()
        self.last_data = self.since
        self.request: web.BaseRequest | None = None
        self.fresh = True  # no request yet on this connection
        # Header deadlines fall between 75 % and 100 % of the timeout: thousands of slow
        # connections opened together then do not all close (and reconnect) together.
        self.spread = random.uniform(0.75, 1.0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._guard.opened(self)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.closed(self)
        self.request = None
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_data = now
        if self.state == _IDLE:
            self.state, self.since = _HEADERS, now
            self._guard.waiting.move_to_end(self)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def close(self, why: str) -> None:
        self._guard.counts[why] += 1
        if self.transport is not None:
            self.transport.abort()


class ConnectionGuard:
    """All open connections, their states, and the watchdog that enforces ``Limits``."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.conns: set[_Guarded] = set()
        #: Connections not handling a request, oldest wait first (eviction order).
        self.waiting: collections.OrderedDict[_Guarded, None] = collections.OrderedDict()
        self.by_transport: dict[Any, _Guarded] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.latest_close_s: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._task: asyncio.Task[None] | None = None

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner())

    # -- connection events
    def opened(self, conn: _Guarded) -> None:
        if len(self.conns) >= self.limits.max_connections:
            if self.waiting:
                victim = next(iter(self.waiting))
                self._forget(victim)
                victim.close("evicted")
            else:
                self.counts["refused"] += 1
                assert conn.transport is not None
                conn.transport.abort()
                return
        self.conns.add(conn)
        self.waiting[conn] = None
        self.by_transport[conn.transport] = conn

    def closed(self, conn: _Guarded) -> None:
        self._forget(conn)

    def _forget(self, conn: _Guarded) -> None:
        self.conns.discard(conn)
        self.waiting.pop(conn, None)
        if conn.transport is not None:
            self.by_transport.pop(conn.transport, None)

    # -- request events (from the middleware)
    def request_started(self, request: web.BaseRequest) -> None:
        conn = self.by_transport.get(request.transport)
        if conn is None:
            return
        conn.state, conn.request, conn.fresh = _BUSY, request, False
        conn.since = time.monotonic()
        self.waiting.pop(conn, None)

    def request_finished(self, request: web.BaseRequest) -> None:
        conn = self.by_transport.get(request.transport)
        if conn is None or conn.request is not request:
            return
        conn.state, conn.request, conn.since = _IDLE, None, time.monotonic()
        if conn in self.conns:
            self.waiting[conn] = None

    def exempt(self, request: web.BaseRequest) -> None:
        """A long-lived request (a WebSocket): no body or header deadline applies."""
        conn = self.by_transport.get(request.transport)
        if conn is not None:
            conn.request = None

    # -- watchdog
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def tick(self) -> float:
        """How often the watchdog looks."""
        lim = self.limits
        return max(0.02, min(0.25, lim.header_timeout_s / 8, lim.body_timeout_s / 8))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                expired = self.sweep(time.monotonic())
                # Close in batches, yielding in between: thousands of connections timing
                # out together must not hold the loop (and /healthz) for long.
                for start in range(0, len(expired), _CLOSE_BATCH):
                    for conn, why in expired[start : start + _CLOSE_BATCH]:
                        conn.close(why)
                    await asyncio.sleep(0)
            except Exception:  # the watchdog must outlive any one bad connection
                log.exception("connection watchdog sweep failed")

    def sweep(self, now: float) -> list[tuple[_Guarded, str]]:
        """The connections past a deadline (already forgotten), with the reason."""
        lim = self.limits
        out: list[tuple[_Guarded, str]] = []
        for conn in list(self.waiting):
            if conn.state == _HEADERS or conn.fresh:
                # minus two ticks: closed by the timeout even when a sweep runs late
                limit = max(
                    lim.header_timeout_s * conn.spread - 2 * self.tick, lim.header_timeout_s / 2
                )
                why = "header_timeout"
            else:
                limit, why = lim.keepalive_timeout_s, "keepalive_timeout"
            late = now - conn.since - limit
            if late > 0:
                self.latest_close_s[why] = max(self.latest_close_s[why], limit + late)
                self._forget(conn)
                out.append((conn, why))
        for conn in list(self.conns):
            req = conn.request
            if conn.state != _BUSY or req is None or conn.transport is None:
                continue
            idle = now - max(conn.last_data, conn.since)
            if idle > lim.body_timeout_s and not req.content.is_eof():
                if conn.transport.is_reading():
                    why = "body_timeout"
                    self.latest_close_s[why] = max(self.latest_close_s[why], idle)
                    self._forget(conn)
                    out.append((conn, why))
        return out

    def snapshot(self) -> dict[str, Any]:
        """Open connections, closes by reason, and the longest a closed one lived past its
        last deadline's start (for ``GET /admin/v1/stats``)."""
        return {
            "open": len(self.conns),
            "closed": dict(self.counts),
            "longest_s": {k: round(v, 3) for k, v in self.latest_close_s.items()},
        }


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a ``ConnectionGuard``."""

    def __init__(self, runner: web.BaseRunner, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(runner, **kwargs)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            self._guard.factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
