"""How the platform reaches leaves: RabbitMQ (provisioning + a confirming publisher) and
a WebSocket hub.

AMQP (PROTOCOL.md 4a): per tree a vhost, per branch a durable fanout exchange named by the
branch id, per leaf a durable queue named by the leaf id bound to it. Messages are
persistent and every publish waits for the broker's confirm, so an ``aggregation_status``
the platform reports as sent is on disk in the broker.

The publisher is pika's ``BlockingConnection`` in one thread per vhost, each fed by its
own queue (aio-pika is not a dependency): an AMQP connection is bound to one vhost, and a
vhost whose publishes fail (deleted, or refused by the broker) retries only in front of
its own messages, never another tree's.

WebSocket (4b): single-use tickets that expire after ``TICKET_TTL_S``; the server pings.
Once a leaf has asked for a ticket, up to ``WS_BACKLOG`` messages wait for it in memory
while it is not connected (not across a platform restart: AMQP is the durable transport).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
from aiohttp import WSCloseCode, web

from bk_sim.broker import ManagementAPI
from bk_sim.errors import BrokerError, PlatformError
from bk_sim.platform._faults import BranchFaults

log = logging.getLogger(__name__)

TICKET_TTL_S = 30.0
WS_HEARTBEAT_S = 20.0
WS_BACKLOG = 32
PUBLISH_RETRY_WINDOW_S = 30.0
#: A vhost's publishing thread and connection end after this long without a publish.
VHOST_IDLE_S = 60.0
_PROVISION_WORKERS = 4


def message(message_type: str, **body: Any) -> str:
    """One notification as the JSON text both transports carry."""
    return json.dumps({"message_type": message_type, "body": body})


# --------------------------------------------------------------------------- AMQP


def connection_name() -> str:
    """How this platform's AMQP connections are named on the broker (one per process)."""
    return f"bk-sim-platform-{os.getpid()}"


def amqp_user(amqp_url: str) -> str:
    """The user the platform publishes as (it needs full rights on every tree vhost)."""
    return unquote(urlsplit(amqp_url).username or "guest")


@dataclass
class _Job:
    exchange: str
    routing_key: str
    body: bytes
    future: concurrent.futures.Future[None]


class _VhostWorker:
    """One vhost's publishes, in order, from its own thread and connection.

    A vhost's retries (the broker refuses it, or the tree was just deleted) wait only in
    front of that vhost's later messages, never in front of another tree's. ``cancel``
    fails what is queued and ends the retries at once.
    """

    def __init__(self, owner: AmqpPublisher, vhost: str) -> None:
        self.vhost = vhost
        self._owner = owner
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.cancelled = threading.Event()
        self._conn: tuple[pika.BlockingConnection, Any] | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"bk-sim-amqp-{vhost[:8]}", daemon=True
        )

    def cancel(self, why: str) -> None:
        self.cancelled.set()
        self.jobs.put(None)
        self._fail_queued(why)

    def _fail_queued(self, why: str) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.future.done():
                job.future.set_exception(BrokerError(f"publish to vhost {self.vhost}: {why}"))

    def _run(self) -> None:
        idle_since = time.monotonic()
        while not self.cancelled.is_set() and not self._owner.stopping.is_set():
            try:
                job = self.jobs.get(timeout=1.0)
            except queue.Empty:
                self._heartbeat()
                if time.monotonic() - idle_since > VHOST_IDLE_S and self._owner.retire(self):
                    break
                continue
            if job is None:
                continue
            try:
                self._publish_with_retry(job)
            except Exception as exc:  # anything else must not kill the thread
                # A dead thread would leave this and every later future unresolved, and
                # whoever awaits them (a round's notification, a run-status call) hangs.
                log.exception("publisher: unexpected error publishing to vhost %s", self.vhost)
                self._drop()
                if not job.future.done():
                    job.future.set_exception(
                        BrokerError(f"publish to vhost {self.vhost} failed: {exc!r}")
                    )
            idle_since = time.monotonic()
        self._drop()
        why = "the tree was deleted" if self.cancelled.is_set() else "the publisher is stopped"
        self._fail_queued(why)

    def _heartbeat(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn[0].process_data_events(time_limit=0)
        except pika.exceptions.AMQPError:
            self._drop()

    def _channel(self) -> Any:
        if self._conn is not None:
            conn, ch = self._conn
            if conn.is_open and ch.is_open:
                return ch
            self._drop()
        conn = pika.BlockingConnection(self._owner.params(self.vhost))
        ch = conn.channel()
        ch.confirm_delivery()
        self._conn = (conn, ch)
        return ch

    def _drop(self) -> None:
        conn, self._conn = (self._conn or (None, None))[0], None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a dead connection; nothing to do
                pass

    def _publish_with_retry(self, job: _Job) -> None:
        deadline = time.monotonic() + PUBLISH_RETRY_WINDOW_S
        delay = 0.2
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        while True:
            try:
                ch = self._channel()
                ch.basic_publish(job.exchange, job.routing_key, job.body, properties=props)
                job.future.set_result(None)
                return
            except pika.exceptions.AMQPError as exc:
                self._drop()
                ending = self.cancelled.is_set() or self._owner.stopping.is_set()
                if ending or time.monotonic() + delay > deadline:
                    if not self.cancelled.is_set():
                        log.error(
                            "notification to vhost %s exchange %r lost: %r",
                            self.vhost,
                            job.exchange,
                            exc,
                        )
                    job.future.set_exception(
                        BrokerError(f"publish to vhost {self.vhost} failed: {exc!r}")
                    )
                    return
                log.warning(
                    "publish to vhost %s failed (%r); retrying in %.1fs", self.vhost, exc, delay
                )
                self.cancelled.wait(delay)
                delay = min(delay * 2, 5.0)


class AmqpPublisher:
    """Publishes persistent messages with publisher confirms, one thread per vhost."""

    def __init__(self, amqp_url: str) -> None:
        self._url = amqp_url
        self._workers: dict[str, _VhostWorker] = {}
        self._deleted: set[str] = set()  # tree ids are never reused
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def params(self, vhost: str | None) -> pika.URLParameters:
        """Connection parameters for ``vhost`` (None: the URL's own)."""
        try:
            params = pika.URLParameters(self._url)
        except Exception as exc:  # pika raises assorted errors for a malformed URL
            raise PlatformError(f"bad --amqp-url: {exc}") from exc
        if vhost is not None:
            params.virtual_host = vhost
        params.client_properties = {"connection_name": connection_name()}
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.blocked_connection_timeout = 30
        return params

    def check(self) -> None:
        """Connect once to the URL's own vhost: raises ``BrokerError`` when unreachable."""
        params = self.params(None)
        try:
            pika.BlockingConnection(params).close()
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot connect to RabbitMQ for publishing: {exc!r}") from exc

    def start(self) -> None:
        """Nothing to start: a vhost's worker starts with its first publish."""

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.jobs.put(None)
        deadline = time.monotonic() + timeout
        for w in workers:
            w.thread.join(max(0.0, deadline - time.monotonic()))

    def publish(
        self, vhost: str, exchange: str, routing_key: str, body: bytes
    ) -> concurrent.futures.Future[None]:
        """Queue one persistent publish; the future resolves when the broker confirms."""
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self.stopping.is_set():
                fut.set_exception(PlatformError("the publisher is stopped"))
                return fut
            if vhost in self._deleted:
                fut.set_exception(BrokerError(f"vhost {vhost} belongs to a deleted tree"))
                return fut
            worker = self._workers.get(vhost)
            if worker is None:
                worker = self._workers[vhost] = _VhostWorker(self, vhost)
                worker.thread.start()
            worker.jobs.put(_Job(exchange, routing_key, body, fut))
        return fut

    def forget_vhost(self, vhost: str) -> None:
        """A tree is deleted: its queued and retrying publishes fail now, its thread ends."""
        with self._lock:
            self._deleted.add(vhost)
            worker = self._workers.pop(vhost, None)
        if worker is not None:
            worker.cancel("the tree was deleted")

    def retire(self, worker: _VhostWorker) -> bool:
        """An idle worker leaves, unless a publish was queued for it meanwhile."""
        with self._lock:
            if not worker.jobs.empty() or self._workers.get(worker.vhost) is not worker:
                return worker.cancelled.is_set()
            del self._workers[worker.vhost]
            return True


class Provisioner:
    """The broker topology of trees, branches and leaves, through the management API."""

    def __init__(self, management_url: str, amqp_url: str) -> None:
        self._url = management_url
        self._platform_user = amqp_user(amqp_url)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(_PROVISION_WORKERS, thread_name_prefix="bk-sim-provision")

    def _api(self) -> ManagementAPI:
        api = getattr(self._local, "api", None)
        if api is None:
            api = self._local.api = ManagementAPI(self._url)
        return api

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def check(self) -> None:
        self._api().overview()

    def create_tree(self, tree_id: str) -> None:
        api = self._api()
        api.create_vhost(tree_id)
        api.set_permissions(tree_id, self._platform_user, ".*", ".*", ".*")

    def create_branch(self, tree_id: str, branch_id: str) -> None:
        self._api().declare_exchange(tree_id, branch_id, "fanout")

    def _create_leaf(self, tree_id: str, branch_id: str, leaf_id: str, token: str) -> None:
        api = self._api()
        api.create_user(leaf_id, token)
        api.set_permissions(tree_id, leaf_id, configure="", write="", read=f"^{leaf_id}$")
        api.declare_queue(tree_id, leaf_id)
        api.bind(tree_id, branch_id, leaf_id)

    def create_leaves(
        self, tree_id: str, branch_id: str, leaves: Sequence[tuple[str, str]]
    ) -> None:
        """Provision ``(leaf_id, session_token)`` pairs a few at a time."""
        futures = [
            self._pool.submit(self._create_leaf, tree_id, branch_id, leaf_id, token)
            for leaf_id, token in leaves
        ]
        for fut in futures:
            fut.result()

    def delete_tree(self, tree_id: str, leaf_ids: Iterable[str]) -> None:
        api = self._api()
        for fut in [
            self._pool.submit(lambda u: self._api().delete_user(u), leaf) for leaf in leaf_ids
        ]:
            fut.result()
        api.delete_vhost(tree_id)


# --------------------------------------------------------------------------- WebSocket


class WsHub:
    """Tickets, live WebSocket connections per leaf, and a small backlog per leaf."""

    def __init__(self) -> None:
        self._tickets: dict[str, tuple[str, str, float]] = {}
        self._expiry: collections.deque[tuple[float, str]] = collections.deque()
        self._conns: dict[str, set[web.WebSocketResponse]] = collections.defaultdict(set)
        self._backlog: dict[str, collections.deque[str]] = {}
        self._closing: set[asyncio.Task[bool]] = set()

    def issue_ticket(self, leaf_id: str, ticket_id: str, request_id: str) -> float:
        """Register a ticket; returns its expiry as a Unix time."""
        now = time.time()
        # Tickets expire in the order they were issued (one TTL), so only the oldest are
        # looked at: O(1) amortised, however many tickets are outstanding.
        while self._expiry and self._expiry[0][0] < now:
            _, old = self._expiry.popleft()
            entry = self._tickets.get(old)
            if entry is not None and entry[2] < now:
                del self._tickets[old]
        expires = now + TICKET_TTL_S
        self._tickets[ticket_id] = (leaf_id, request_id, expires)
        self._expiry.append((expires, ticket_id))
        if leaf_id not in self._conns:
            # Messages sent between the ticket and the connection wait for it: a leaf that
            # uploads right after asking for its first ticket lost its first notification.
            self._backlog.setdefault(leaf_id, collections.deque(maxlen=WS_BACKLOG))
        return expires

    def redeem(self, ticket_id: str, request_id: str) -> str | None:
        """The ticket's leaf id if valid; a ticket is consumed by any attempt to use it."""
        entry = self._tickets.pop(ticket_id, None)
        if entry is None:
            return None
        leaf_id, req, expires = entry
        if req != request_id or expires < time.time():
            return None
        return leaf_id

    async def attach(self, leaf_id: str, ws: web.WebSocketResponse) -> None:
        """Register a connection and hand it the messages that waited for the leaf.

        A send that fails (the leaf went away again at once) puts the undelivered ones
        back, ahead of any that arrived meanwhile, for the next connection.
        """
        self._conns[leaf_id].add(ws)
        pending = self._backlog.pop(leaf_id, None) or collections.deque()
        while pending:
            try:
                await ws.send_str(pending[0])
            except (ConnectionError, RuntimeError) as exc:
                log.debug("WebSocket backlog send to a leaf failed: %r", exc)
                kept = self._backlog.setdefault(leaf_id, collections.deque(maxlen=WS_BACKLOG))
                kept.extendleft(reversed(pending))
                return
            pending.popleft()

    def detach(self, leaf_id: str, ws: web.WebSocketResponse) -> None:
        conns = self._conns.get(leaf_id)
        if conns is not None:
            conns.discard(ws)
            if not conns:
                del self._conns[leaf_id]
                self._backlog.setdefault(leaf_id, collections.deque(maxlen=WS_BACKLOG))

    async def send(self, leaf_id: str, text: str) -> None:
        conns = [ws for ws in self._conns.get(leaf_id, ()) if not ws.closed]
        if not conns:
            backlog = self._backlog.get(leaf_id)
            if backlog is None and leaf_id in self._conns:  # closing, not yet detached
                backlog = self._backlog[leaf_id] = collections.deque(maxlen=WS_BACKLOG)
            if backlog is not None:
                backlog.append(text)
            return
        for ws in conns:
            try:
                await ws.send_str(text)
            except (ConnectionError, RuntimeError) as exc:
                log.debug("WebSocket send to a leaf failed: %r", exc)

    def drop_leaves(self, leaf_ids: Iterable[str]) -> None:
        """Deleted leaves: close their WebSockets now (in the background), forget them."""
        gone = set(leaf_ids)
        for leaf_id in gone:
            self._backlog.pop(leaf_id, None)
            for ws in self._conns.pop(leaf_id, set()):
                task = asyncio.get_running_loop().create_task(
                    ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"leaf deleted")
                )
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        for tid in [t for t, entry in self._tickets.items() if entry[0] in gone]:
            del self._tickets[tid]

    async def close_all(self) -> None:
        for conns in list(self._conns.values()):
            for ws in list(conns):
                await ws.close()


# --------------------------------------------------------------------------- both


class Notifier:
    """Sends one notification to a branch's leaves over AMQP and WebSocket."""

    def __init__(self, publisher: AmqpPublisher | None, hub: WsHub) -> None:
        self.publisher = publisher
        self.hub = hub

    async def notify(
        self,
        branch: dict[str, Any],
        leaf_ids: Sequence[str],
        text: str,
        faults: BranchFaults | None,
    ) -> None:
        if faults is not None and faults.notifications.delay_s > 0:
            await asyncio.sleep(faults.notifications.delay_s)
        dropping = faults is not None and faults.notifications.drop_rate > 0
        targets = [
            leaf
            for leaf in leaf_ids
            if not (dropping and faults is not None and faults.drop_notification())
        ]
        for leaf in targets:
            await self.hub.send(leaf, text)
        if self.publisher is None:
            return
        body = text.encode()
        if dropping:
            # Per-leaf publishes through the default exchange so each leaf can be skipped.
            futures = [
                self.publisher.publish(branch["tree_id"], "", leaf, body) for leaf in targets
            ]
        else:
            futures = [self.publisher.publish(branch["tree_id"], branch["id"], "", body)]
        for fut in futures:
            try:
                await asyncio.wrap_future(fut)
            except BrokerError as exc:
                log.error("notification for branch %s not delivered: %s", branch["id"], exc)
