"""The Locust user: one leaf, driven through the faithful ``bk_sim.client.Client``.

How it relates to ``bk_sim.sim.LeafAgent``: the same leaf behaviour (upload weights, wait
for the aggregation notification, download the aggregate), cut into independent Locust
tasks with weights from ``load.tasks`` (plus the two calls a leaf makes besides: metrics
and branch config), because a load test wants a steady request mix rather than lock-step
rounds. ``LeafAgent`` is not reused as is: it plays whole rounds, generates and encodes
its tensors on the hot path (the load generator must spend its CPU on requests, so
payloads are made before the load; see ``_payloads``), and writes an event log where
Locust wants ``request`` events. Both drive the same ``Client``, so every HTTP attempt,
retry and notification is the client's own.

Under Locust, gevent has monkey-patched ``threading``, ``socket``, ``select`` and
``queue``. The client's consumers then run as greenlets: the AMQP one (pika
``SelectConnection`` on a private IOLoop) with a cooperative ``select``, the WebSocket one
(blocking ``websockets.sync`` sockets) with cooperative sockets; hundreds of consumers in
one process. ``client.queue`` uses only the public ``Queue`` API, so gevent's ``Queue``
serves it too. The user picks its consumer through the client's ``consumer_factory``
extension point (``LoadContext.consumer_factory``), never by overriding the client.
"""

from __future__ import annotations

import collections
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from locust import User, between
from locust.exception import StopUser
from locust.user.task import LOCUST_STATE_STOPPING

from bk_sim.client import (
    APIConfig,
    Client,
    ConsumerFactory,
    RabbitMQConfig,
    RetryConfig,
    WebSocketConfig,
    amqp_consumer,
    websocket_consumer,
)
from bk_sim.errors import BkSimError, RunBlockedError
from bk_sim.load._observer import NOTIFY, Counters, LocustObserver, NotificationFailed
from bk_sim.load._payloads import PayloadCache
from bk_sim.scenario import Scenario

_log = logging.getLogger(__name__)

#: How often a waiting download task checks whether the user is being stopped.
_WAIT_SLICE_S = 0.25
#: How long a user waits for a worker's setup from the master before it gives up.
SETUP_TIMEOUT_S = 60.0


@dataclass
class LoadContext:
    """What every user of this process shares: where the platform is, leaves, payloads.

    On a distributed worker it is filled in when the master's setup arrives (``ready``).
    """

    scenario: Scenario
    work_dir: Path
    counters: Counters = field(default_factory=Counters)
    api_url: str = ""
    amqp_host: str | None = None
    amqp_port: int | None = None
    amqp_ssl: bool = False
    transport: str = "amqp"
    credentials: list[dict[str, str]] = field(default_factory=list)
    payloads: PayloadCache | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    _free: collections.deque[int] = field(default_factory=collections.deque)
    _next: int = 0
    _clients: set[Client] = field(default_factory=set)

    def configure(
        self,
        *,
        api_url: str,
        credentials: list[dict[str, str]],
        transport: str,
        amqp_host: str | None,
        amqp_port: int | None,
        amqp_ssl: bool = False,
    ) -> None:
        self.api_url = api_url
        self.credentials = list(credentials)
        self.transport = transport
        self.amqp_host = amqp_host
        self.amqp_port = amqp_port
        self.amqp_ssl = amqp_ssl
        self.ready.set()

    def take_slot(self) -> int:
        """A leaf no live user holds; when all are taken, leaves are shared (logged)."""
        if self._free:
            return self._free.popleft()
        slot = self._next
        self._next += 1
        if slot >= len(self.credentials):
            _log.warning("more users than leaves (%d): leaves are shared", len(self.credentials))
            self.counters.add("shared_leaf_users")
        return slot

    def release_slot(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def consumer_factory(self) -> ConsumerFactory:
        """The notification consumer of this run's transport (both serve gevent)."""
        return websocket_consumer if self.transport == "websocket" else amqp_consumer

    def new_client(self, slot: int, observer: LocustObserver) -> Client:
        sc = self.scenario
        rc = sc.client.reconnect
        client = Client(
            self.credentials[slot % len(self.credentials)],
            api_config=APIConfig(host=self.api_url, ssl=self.api_url.startswith("https")),
            rabbitmq_config=RabbitMQConfig(
                host=self.amqp_host,
                port=self.amqp_port or (5671 if self.amqp_ssl else 5672),
                ssl=self.amqp_ssl,
                max_reconnect_attempts=rc.max_attempts,
                reconnect_backoff_factor=rc.backoff_factor,
                reconnect_max_delay=rc.max_delay,
                heartbeat=rc.heartbeat,
            ),
            websocket_config=WebSocketConfig(
                max_reconnect_attempts=rc.max_attempts,
                reconnect_backoff_factor=rc.backoff_factor,
                reconnect_max_delay=rc.max_delay,
            ),
            retry_config=RetryConfig(
                max_retries=sc.client.retry.max_retries,
                backoff_factor=sc.client.retry.backoff_factor,
                total_timeout=sc.client.retry.total_timeout,
            ),
            use_websocket=self.transport == "websocket",
            notifications=sc.load.notifications,
            output_dir=self.work_dir / f"leaf-{slot}",
            observer=observer,
            consumer_factory=self.consumer_factory,
        )
        self._clients.add(client)
        return client

    def forget(self, client: Client) -> None:
        self._clients.discard(client)

    def close_all(self) -> None:
        """Close clients whose users were killed before their ``on_stop`` ran."""
        for client in list(self._clients):
            client.close()
        self._clients.clear()


class LeafUser(User):
    """One leaf; the concrete class (tasks, wait time, context) comes from ``user_class``."""

    abstract = True
    # Not ``context``: that name is Locust's ``User.context()`` (request-event context).
    load_context: LoadContext

    def on_start(self) -> None:
        ctx = self.load_context
        if not ctx.ready.wait(SETUP_TIMEOUT_S):
            _log.error("no setup from the master within %.0f s: user stops", SETUP_TIMEOUT_S)
            raise StopUser()
        self.slot = ctx.take_slot()
        self.observer = LocustObserver(self.environment, ctx.counters)
        self.last_aggregation_id: str | None = None
        try:
            self.client: Client | None = ctx.new_client(self.slot, self.observer)
        except BkSimError as exc:
            # The failed attempts are already in Locust's table (the observer saw them).
            _log.warning("leaf client of slot %d could not start: %s", self.slot, exc)
            ctx.counters.add("client_start_failed")
            ctx.release_slot(self.slot)
            self.client = None
            raise StopUser() from exc

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is None:
            return
        client.close()
        self.load_context.forget(client)
        self.load_context.release_slot(self.slot)
        shutil.rmtree(client.settings.output_dir, ignore_errors=True)
        self.client = None

    # ------------------------------------------------------------------ tasks

    def upload(self) -> None:
        client = self._client()
        assert self.load_context.payloads is not None
        try:
            client.file_upload(self.load_context.payloads.path(self.slot))
        except RunBlockedError as exc:
            self._refused("upload", exc)
        except BkSimError as exc:
            _log.debug("upload failed: %s", exc)

    def download(self) -> None:
        client = self._client()
        if not self.load_context.scenario.load.notifications:
            if self.last_aggregation_id is None:
                return  # nothing to download: without notifications no id ever arrives
            aggregation_id: str | None = self.last_aggregation_id
        else:
            aggregation_id = self._await_aggregation(client)
            if aggregation_id is None:
                return
        assert aggregation_id is not None
        try:
            Path(client.file_download(aggregation_id)).unlink(missing_ok=True)
        except BkSimError as exc:
            _log.debug("download of %s failed: %s", aggregation_id, exc)

    def metrics(self) -> None:
        client = self._client()
        client.send_performance_metrics(
            self.last_aggregation_id or "none",
            {"accuracy": 0.5, "loss": 0.5, "leaf": self.slot},
            mode="test",
        )

    def branch_config(self) -> None:
        try:
            self._client().get_branch_config()
        except BkSimError as exc:
            _log.debug("branch config failed: %s", exc)

    # ------------------------------------------------------------------ helpers

    def _client(self) -> Client:
        if self.client is None:
            raise StopUser()
        return self.client

    def _await_aggregation(self, client: Client) -> str | None:
        """The newest aggregation id (waiting for one if none is unread); None on stop."""
        wait = self.load_context.scenario.load.aggregate_wait_s
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait:
            if self._state == LOCUST_STATE_STOPPING:
                return None
            try:
                agg: str = client.queue.get(timeout=min(_WAIT_SLICE_S, wait))
            except queue.Empty:
                continue
            self.last_aggregation_id = agg
            return agg
        self.environment.events.request.fire(
            request_type=NOTIFY,
            name="aggregate_wait",
            response_time=(time.monotonic() - t0) * 1000.0,
            response_length=0,
            exception=NotificationFailed(f"no aggregation notification within {wait:g} s"),
            context={},
        )
        return None

    def _refused(self, name: str, exc: Exception) -> None:
        self.environment.events.request.fire(
            request_type="CLIENT",
            name=name,
            response_time=0.0,
            response_length=0,
            exception=exc,
            context={},
        )


_TASKS: dict[str, Callable[[LeafUser], None]] = {
    "upload": LeafUser.upload,
    "download": LeafUser.download,
    "metrics": LeafUser.metrics,
    "branch_config": LeafUser.branch_config,
}


def user_class(context: LoadContext) -> type[LeafUser]:
    """The concrete ``LeafUser`` of a run: task weights and waits from ``load``."""
    spec = context.scenario.load
    tasks = {
        fn: getattr(spec.tasks, name) for name, fn in _TASKS.items() if getattr(spec.tasks, name)
    }
    attrs = {
        "abstract": False,
        "load_context": context,
        "tasks": tasks,
        "wait_time": between(spec.wait_min_s, spec.wait_max_s),
        "__module__": __name__,
        "__doc__": LeafUser.__doc__,
    }
    return type("LeafUser", (LeafUser,), attrs)
