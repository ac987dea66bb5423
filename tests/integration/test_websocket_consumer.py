"""The WebSocket notification consumer against a real aiohttp WebSocket server (PROTOCOL 4b).

The server runs on 127.0.0.1 on an ephemeral port in its own thread, pings its clients
(aiohttp heartbeat: a client that does not answer pongs is dropped), and admits a socket
only with a ticket it issued, that is fresh and that was never used before.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from bk_sim.client import EventSink, WebSocketConfig, reconnect_delay
from bk_sim.client._websocket import WebSocketConsumer
from bk_sim.errors import TransportError
from tests.support import Recorder

AGG = {"message_type": "aggregation_status", "body": {"aggregation_id": "agg-1"}}
RUN = {"message_type": "run_status", "body": {"run_status": "pause"}}


class _WsServer:
    """``/api/v1/ws`` of the platform, reduced to tickets, pings and pushes."""

    def __init__(self, heartbeat: float = 0.25, ticket_ttl: float = 5.0) -> None:
        self.heartbeat = heartbeat
        self.ticket_ttl = ticket_ttl
        self._lock = threading.Lock()
        self._tickets: dict[str, tuple[str, float]] = {}  # ticket_id -> (request_id, issued)
        self._used: set[str] = set()
        self.admitted: list[str] = []
        self.refused: list[str] = []
        self._sockets: dict[web.WebSocketResponse, web.Request] = {}
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._started.wait(5), "WebSocket test server did not start"
        self.url = f"ws://127.0.0.1:{self.port}/api/v1/ws"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/api/v1/ws", self._ws)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started.set()
        self._loop.run_forever()

    def issue_ticket(self) -> dict[str, Any]:
        """What ``POST /api/v1/ws/ticket`` would return in ``data``."""
        ticket, request_id = str(uuid.uuid4()), str(uuid.uuid4())
        with self._lock:
            self._tickets[ticket] = (request_id, time.monotonic())
        return {"ticket_id": ticket, "request_id": request_id, "expires_at": "soon"}

    def _admit(self, ticket: str, request_id: str) -> str | None:
        with self._lock:
            entry = self._tickets.get(ticket)
            if entry is None:
                return "unknown ticket"
            if ticket in self._used:
                return "ticket already used"
            if entry[0] != request_id:
                return "request_id does not match"
            if time.monotonic() - entry[1] > self.ticket_ttl:
                return "ticket expired"
            self._used.add(ticket)
            return None

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        why = self._admit(ticket, request.query.get("request_id", ""))
        if why is not None:
            self.refused.append(why)
            return web.Response(status=403, text=why)
        self.admitted.append(ticket)
        ws = web.WebSocketResponse(heartbeat=self.heartbeat)
        await ws.prepare(request)
        self._sockets[ws] = request
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets.pop(ws, None)
        return ws

    def _call(self, coro_fn: Callable[[], Any]) -> None:
        asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(5)

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    def send(self, *frames: str) -> None:
        async def go() -> None:
            for ws in list(self._sockets):
                for f in frames:
                    await ws.send_str(f)

        self._call(go)

    def drop(self, code: int = 1011) -> None:
        """Close every socket with a close frame (``code``)."""

        async def go() -> None:
            for ws in list(self._sockets):
                await ws.close(code=code, message=b"test drop")

        self._call(go)

    def abort(self) -> None:
        """Cut every socket's TCP stream without a close frame."""

        async def go() -> None:
            for request in list(self._sockets.values()):
                if request.transport is not None:
                    request.transport.abort()

        self._call(go)

    def stop(self) -> None:
        self._call(self._runner.cleanup)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture()
def server() -> Any:
    srv = _WsServer()
    yield srv
    srv.stop()


def _consumer(
    url: str,
    get_ticket: Callable[[], dict[str, Any]],
    rec: Recorder,
    *,
    attempts: int = 5,
    factor: float = 1.2,
    max_delay: float = 2.0,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> WebSocketConsumer:
    cfg = WebSocketConfig(
        max_reconnect_attempts=attempts,
        reconnect_backoff_factor=factor,
        reconnect_max_delay=max_delay,
        open_timeout=3.0,
    )
    return WebSocketConsumer(
        url, cfg, get_ticket, on_message or rec.on_message, EventSink(rec, "leaf-ws")
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_messages_arrive_in_order_and_pings_are_answered(server: _WsServer) -> None:
    rec = Recorder()
    consumer = _consumer(server.url, server.issue_ticket, rec)
    consumer.start()
    try:
        rec.wait_count("connect", 1, 5)
        assert consumer.connected
        server.send(json.dumps(AGG), "not json {", "[1, 2]", "[" * 100_000, json.dumps(RUN))
        rec.wait(lambda: len(rec.messages) >= 2, 5, "2 messages")
        # The server pings every 0.25 s and drops a client that does not pong in time.
        time.sleep(1.5)
        assert consumer.connected and server.open_sockets == 1
    finally:
        consumer.close()
    assert rec.messages == [AGG, RUN]
    assert [e.kind for e in rec.events] == ["connect", "consumer_stopped"]
    assert rec.events[0].transport == "websocket"
    assert len(server.admitted) == 1 and not server.refused


def test_server_drops_socket_then_new_ticket_and_backoff(server: _WsServer) -> None:
    factor, max_delay = 1.2, 2.0
    rec = Recorder()
    tickets: list[str] = []

    def get_ticket() -> dict[str, Any]:
        t = server.issue_ticket()
        tickets.append(t["ticket_id"])
        return t

    consumer = _consumer(server.url, get_ticket, rec, factor=factor, max_delay=max_delay)
    consumer.start()
    reconnect_s: list[float] = []
    try:
        rec.wait_count("connect", 1, 5)
        for i, cut in enumerate([server.drop, server.abort, server.drop], start=1):
            t0 = time.time()
            cut()
            rec.wait_count("disconnect", i, 5)
            rec.wait_count("connect", i + 1, factor + 5)
            reconnect_s.append(rec.of("connect")[-1].t - t0)
            server.send(json.dumps({**AGG, "body": {"aggregation_id": f"after-{i}"}}))
            rec.wait(lambda: len(rec.messages) >= i, 5, f"message after reconnect {i}")  # noqa: B023
    finally:
        consumer.close()
    print(
        f"\nwebsocket reconnect after a server drop: median={statistics.median(reconnect_s):.3f}s "
        f"max={max(reconnect_s):.3f}s"
    )
    assert [m["body"]["aggregation_id"] for m in rec.messages] == ["after-1", "after-2", "after-3"]
    assert len(tickets) == 4 and len(set(tickets)) == 4  # a fresh ticket for every connect
    assert server.admitted == tickets and not server.refused
    waits = rec.of("reconnect_wait")
    assert [w.attempt for w in waits] == [1, 1, 1]
    assert all(w.delay_s == reconnect_delay(1, factor, max_delay) for w in waits)
    assert all(factor - 0.05 <= r <= factor + 1.0 for r in reconnect_s), reconnect_s
    errors = [d.error or "" for d in rec.of("disconnect")]
    assert "1011" in errors[0] and "without a close frame" in errors[1] and "1011" in errors[2]


def test_reused_ticket_is_refused_retried_then_given_up(server: _WsServer) -> None:
    rec = Recorder()
    fixed = server.issue_ticket()
    consumer = _consumer(server.url, lambda: fixed, rec, attempts=2, factor=1.1, max_delay=0.2)
    consumer.start()
    try:
        rec.wait_count("connect", 1, 5)
        server.drop(1001)
        rec.wait_count("give_up", 1, 5)
    finally:
        consumer.close()
    failed = rec.of("connect_failed")
    assert [f.attempt for f in failed] == [1, 2]
    assert all("HTTP 403 (ticket refused)" in (f.error or "") for f in failed)
    assert server.refused == ["ticket already used", "ticket already used"]
    assert rec.of("give_up")[0].attempt == 2
    assert not consumer.connected


def test_server_down_retries_on_schedule_then_gives_up() -> None:
    rec = Recorder()
    calls: list[float] = []

    def get_ticket() -> dict[str, Any]:
        calls.append(time.monotonic())
        return {"ticket_id": str(uuid.uuid4()), "request_id": "r", "expires_at": "x"}

    url = f"ws://127.0.0.1:{_closed_port()}/api/v1/ws"
    consumer = _consumer(url, get_ticket, rec, attempts=3, factor=1.1, max_delay=1.25)
    t0 = time.monotonic()
    consumer.start()
    assert time.monotonic() - t0 < 0.2
    try:
        rec.wait_count("give_up", 1, 10)
    finally:
        consumer.close()
    failed, waits = rec.of("connect_failed"), rec.of("reconnect_wait")
    assert [f.attempt for f in failed] == [0, 1, 2, 3]
    assert [w.delay_s for w in waits] == [1.1, pytest.approx(1.21), 1.25]
    for w, f in zip(waits, failed[1:], strict=True):
        assert w.delay_s - 0.02 <= f.t - w.t <= w.delay_s + 0.5
    assert all("ConnectionRefusedError" in (f.error or "") for f in failed)
    assert len(calls) == 4  # a ticket per attempt
    assert rec.events[-1].kind == "give_up"


def test_ticket_errors_are_retried(server: _WsServer) -> None:
    rec = Recorder()
    n = {"calls": 0}

    def get_ticket() -> dict[str, Any]:
        n["calls"] += 1
        if n["calls"] == 1:
            raise TransportError("POST /api/v1/ws/ticket: connection refused")
        if n["calls"] == 2:
            return {"request_id": "no ticket id"}
        return server.issue_ticket()

    consumer = _consumer(server.url, get_ticket, rec, attempts=0, factor=1.1, max_delay=0.1)
    consumer.start()
    try:
        rec.wait_count("connect", 1, 5)
    finally:
        consumer.close()
    errors = [f.error or "" for f in rec.of("connect_failed")]
    assert errors == [
        "ticket request failed: POST /api/v1/ws/ticket: connection refused",
        "ticket response has no ticket_id",
    ]
    assert rec.of("connect")[0].attempt == 2


def test_close_is_prompt_in_backoff_and_while_connected(server: _WsServer) -> None:
    rec = Recorder()
    url = f"ws://127.0.0.1:{_closed_port()}/api/v1/ws"
    consumer = _consumer(url, server.issue_ticket, rec, attempts=0, factor=30, max_delay=60)
    consumer.start()
    rec.wait_count("reconnect_wait", 1, 5)
    t0 = time.monotonic()
    consumer.close()
    assert time.monotonic() - t0 < 1.0
    consumer.close()  # idempotent
    assert [e.kind for e in rec.events] == ["connect_failed", "reconnect_wait", "consumer_stopped"]

    rec2 = Recorder()
    consumer2 = _consumer(server.url, server.issue_ticket, rec2)
    consumer2.start()
    rec2.wait_count("connect", 1, 5)
    t0 = time.monotonic()
    consumer2.close()
    assert time.monotonic() - t0 < 1.0
    assert not consumer2.connected
    deadline = time.monotonic() + 2
    while server.open_sockets and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.open_sockets == 0  # the socket was really closed, not left behind
    assert [e.kind for e in rec2.events] == ["connect", "consumer_stopped"]


def test_close_from_inside_on_message(server: _WsServer) -> None:
    rec = Recorder()
    holder: dict[str, WebSocketConsumer] = {}

    def on_message(m: dict[str, Any]) -> None:
        rec.on_message(m)
        holder["c"].close()

    consumer = _consumer(server.url, server.issue_ticket, rec, on_message=on_message)
    holder["c"] = consumer
    consumer.start()
    rec.wait_count("connect", 1, 5)
    server.send(json.dumps(AGG))
    rec.wait_count("consumer_stopped", 1, 5)
    consumer.close()
    assert rec.messages == [AGG]


_EXIT_SCRIPT = """
import time
from bk_sim.client import EventSink, WebSocketConfig
from bk_sim.client._websocket import WebSocketConsumer

def hanging_ticket():
    time.sleep(60)  # a ticket request to a black-holed platform
    return {}

c = WebSocketConsumer("ws://127.0.0.1:9/api/v1/ws", WebSocketConfig(), hanging_ticket,
                      lambda m: None, EventSink(None, "x"))
c.start()
time.sleep(0.3)
c.close()
print("closed", flush=True)
"""


def test_a_hanging_ticket_request_does_not_keep_the_process_alive_after_close() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0 and done.stdout.strip() == "closed", done.stderr
    assert time.monotonic() - started < 10  # not the 60 s the ticket call takes
