"""The AMQP notification consumer against the real RabbitMQ (PROTOCOL.md 4, 4a).

Each test provisions its own topology the way the platform does (vhost = tree, user =
leaf with read permission on its queue only, durable fanout exchange = branch, durable
queue = leaf bound to it), publishes as guest, and removes vhost and user afterwards.
Backoff factors are small so the whole file stays within a few tens of seconds.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.client import _amqp
from bk_sim.client._amqp import AmqpConsumer
from bk_sim.client._backoff import reconnect_delay
from bk_sim.client._config import Credentials, RabbitMQConfig
from bk_sim.client._events import EventSink
from tests.support import Recorder

pytestmark = [pytest.mark.rabbitmq]

HOST = "127.0.0.1"
PORT = 5672

AGG = {"message_type": "aggregation_status", "body": {"aggregation_id": "agg-1"}}
RUN = {"message_type": "run_status", "body": {"run_status": "start"}}


# -- helpers ---------------------------------------------------------------------------


@dataclass
class Leaf:
    """One provisioned leaf: its credentials and the names the platform gave it."""

    credentials: Credentials
    management: ManagementAPI

    @property
    def vhost(self) -> str:
        return self.credentials.tree_id

    @property
    def queue(self) -> str:
        return self.credentials.id

    @property
    def exchange(self) -> str:
        return self.credentials.branch_id

    def declare_queue(self) -> None:
        self.management.declare_queue(self.vhost, self.queue)
        self.management.bind(self.vhost, self.exchange, self.queue)

    def publish(self, *messages: dict[str, Any] | bytes) -> None:
        """Publish persistent messages to the branch exchange as guest, as the platform does."""
        params = pika.ConnectionParameters(
            HOST, PORT, self.vhost, pika.PlainCredentials("guest", "guest")
        )
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            for m in messages:
                body = m if isinstance(m, bytes) else json.dumps(m).encode()
                ch.basic_publish(self.exchange, "", body, pika.BasicProperties(delivery_mode=2))
        finally:
            conn.close()

    def queue_counts(self) -> tuple[int, int]:
        """(ready messages, consumers) from a passive declare: exact, unlike management stats."""
        params = pika.ConnectionParameters(
            HOST, PORT, self.vhost, pika.PlainCredentials("guest", "guest")
        )
        conn = pika.BlockingConnection(params)
        try:
            ok = conn.channel().queue_declare(self.queue, passive=True)
            return ok.method.message_count, ok.method.consumer_count
        finally:
            conn.close()


@pytest.fixture()
def leaf(management: ManagementAPI, unique: str) -> Iterator[Leaf]:
    creds = Credentials(
        id=f"amqp-leaf-{unique}",
        name="amqp test leaf",
        session_token=f"token-{unique}",
        owner_id=f"owner-{unique}",
        tree_id=f"amqp-tree-{unique}",
        branch_id=f"amqp-branch-{unique}",
    )
    vhost = creds.tree_id
    management.create_vhost(vhost)
    try:
        management.set_permissions(vhost, "guest", ".*", ".*", ".*")
        management.create_user(creds.id, creds.session_token)
        management.set_permissions(vhost, creds.id, configure="", write="", read=f"^{creds.id}$")
        management.declare_exchange(vhost, creds.branch_id, "fanout")
        lf = Leaf(creds, management)
        lf.declare_queue()
        yield lf
    finally:
        management.delete_vhost(vhost)
        management.delete_user(creds.id)


def _consumer(
    leaf_creds: Credentials,
    rec: Recorder,
    *,
    port: int = PORT,
    attempts: int = 5,
    factor: float = 1.2,
    max_delay: float = 2.0,
    heartbeat: int = 30,
) -> AmqpConsumer:
    cfg = RabbitMQConfig(
        host=HOST,
        port=port,
        ssl=False,
        max_reconnect_attempts=attempts,
        reconnect_backoff_factor=factor,
        reconnect_max_delay=max_delay,
        heartbeat=heartbeat,
    )
    return AmqpConsumer(leaf_creds, cfg, HOST, rec.on_message, EventSink(rec, leaf_creds.id))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class _TcpProxy:
    """A loopback TCP proxy to the broker that can cut or black-hole live connections.

    ``drop()`` closes every live connection (the client sees the stream end);
    ``freeze()`` stops forwarding on every live connection and hides the broker's close
    from the client, so only missed heartbeats can reveal it. New connections always work.
    """

    def __init__(self, target_port: int = PORT) -> None:
        self._target = target_port
        self._srv = socket.create_server((HOST, 0))
        self._srv.settimeout(0.2)
        self.port = int(self._srv.getsockname()[1])
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection((HOST, self._target))
            frozen = threading.Event()
            with self._lock:
                self._pairs.append((client, upstream, frozen))
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst, frozen), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, frozen: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if frozen.is_set():
                    if not data:
                        return  # hide the close: the other side must find out by itself
                    continue
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        if not frozen.is_set():
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _live(self) -> list[tuple[socket.socket, socket.socket, threading.Event]]:
        with self._lock:
            return list(self._pairs)

    def drop(self) -> None:
        for client, upstream, _ in self._live():
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self) -> None:
        for _, _, frozen in self._live():
            frozen.set()

    def close(self) -> None:
        self._closed.set()
        self._srv.close()
        for client, upstream, frozen in self._live():
            frozen.clear()
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(2)
        for client, upstream, _ in self._live():
            client.close()
            upstream.close()


# -- tests -----------------------------------------------------------------------------


def test_both_message_types_arrive_in_order_and_are_acked_once(leaf: Leaf) -> None:
    rec = Recorder()
    consumer = _consumer(leaf.credentials, rec)
    consumer.start()
    try:
        rec.wait_count("connect", 1, 10)
        assert consumer.connected
        sent = [AGG, RUN, {**AGG, "body": {"aggregation_id": "agg-2"}}]
        leaf.publish(*sent)
        rec.wait(lambda: len(rec.messages) >= 3, 10, "3 messages")
        time.sleep(0.3)  # a redelivery would show up here
        assert rec.messages == sent
    finally:
        consumer.close()
    assert not consumer.connected
    assert leaf.queue_counts() == (0, 0)  # unacked messages would be back in the queue
    assert [e.kind for e in rec.events] == ["connect", "consumer_stopped"]
    assert rec.events[0].transport == "amqp" and rec.events[0].attempt == 0


def test_bad_messages_are_logged_acked_and_dropped(leaf: Leaf) -> None:
    rec = Recorder(fail_on=lambda m: m.get("body", {}).get("aggregation_id") == "boom")
    consumer = _consumer(leaf.credentials, rec)
    consumer.start()
    try:
        rec.wait_count("connect", 1, 10)
        boom = {"message_type": "aggregation_status", "body": {"aggregation_id": "boom"}}
        deep = b"[" * 100_000  # json.loads raises RecursionError, not ValueError
        leaf.publish(b"not json {", b"[1, 2]", b"\xff\xfe", deep, boom, RUN)
        rec.wait(lambda: len(rec.messages) >= 2, 10, "2 messages")
        time.sleep(0.3)
        assert rec.messages == [boom, RUN]  # the failing handler's message is not redelivered
        assert consumer.connected
    finally:
        consumer.close()
    assert leaf.queue_counts() == (0, 0)


def test_forced_close_reconnects_each_time_and_loses_nothing(
    leaf: Leaf, management: ManagementAPI
) -> None:
    factor, max_delay = 1.2, 2.0
    rec = Recorder()
    consumer = _consumer(leaf.credentials, rec, attempts=5, factor=factor, max_delay=max_delay)
    consumer.start()
    sent: list[dict[str, Any]] = []
    reconnect_s: list[float] = []
    try:
        rec.wait_count("connect", 1, 10)
        for i in range(1, 5):
            t0 = time.time()
            management.close_user_connections(leaf.queue)
            rec.wait_count("disconnect", i, 5)
            assert not consumer.connected
            away = [{**AGG, "body": {"aggregation_id": f"while-away-{i}-{k}"}} for k in range(2)]
            leaf.publish(*away)
            sent += away
            rec.wait_count("connect", i + 1, reconnect_delay(1, factor, max_delay) + 5)
            reconnect_s.append(rec.of("connect")[-1].t - t0)
            rec.wait_messages(len(sent), 5)
            # Let the acks reach the broker before the next kill: an ack still in flight
            # when a connection dies means a redelivery (AMQP is at-least-once).
            time.sleep(0.2)
    finally:
        consumer.close()
    print(
        f"\nreconnect after forced close: n={len(reconnect_s)} "
        f"median={statistics.median(reconnect_s):.3f}s max={max(reconnect_s):.3f}s "
        f"(backoff wait {reconnect_delay(1, factor, max_delay):.3f}s)"
    )
    assert rec.messages == sent  # each exactly once, in order
    assert leaf.queue_counts() == (0, 0)
    for d in rec.of("disconnect"):
        assert "320" in (d.error or "") and "CONNECTION_FORCED" in (d.error or "")
    waits = rec.of("reconnect_wait")
    assert waits and all(w.delay_s == reconnect_delay(w.attempt, factor, max_delay) for w in waits)
    assert [w.attempt for w in waits] == [1, 1, 1, 1]  # the counter reset after each connect
    assert all(c.attempt == 1 for c in rec.of("connect")[1:])
    # It waited the backoff, then connected quickly: the bound is the wait plus 1 s.
    assert all(factor - 0.05 <= r <= factor + 1.0 for r in reconnect_s), reconnect_s


def test_queue_deleted_then_redeclared_consumes_again(
    leaf: Leaf, management: ManagementAPI
) -> None:
    rec = Recorder()
    consumer = _consumer(leaf.credentials, rec, attempts=0, factor=1.2, max_delay=0.5)
    consumer.start()
    try:
        rec.wait_count("connect", 1, 10)
        management.delete_queue(leaf.vhost, leaf.queue)
        rec.wait_count("disconnect", 1, 5)
        assert "cancelled by the broker" in (rec.of("disconnect")[0].error or "")
        rec.wait_count("connect_failed", 2, 5)  # it keeps trying while the queue is gone
        failed = rec.of("connect_failed")
        assert all("404" in (f.error or "") and "not found" in (f.error or "") for f in failed)
        leaf.declare_queue()
        rec.wait_count("connect", 2, 5)
        assert consumer.connected
        leaf.publish(RUN)
        rec.wait(lambda: rec.messages == [RUN], 5, "the message after re-declare")
    finally:
        consumer.close()
    assert not rec.of("give_up")


def test_broker_unreachable_at_start_follows_schedule_and_gives_up() -> None:
    factor, max_delay, attempts = 1.1, 1.25, 3
    creds = Credentials("leaf-x", "x", "secret", "tree", "branch", "owner")
    rec = Recorder()
    consumer = _consumer(
        creds, rec, port=_closed_port(), attempts=attempts, factor=factor, max_delay=max_delay
    )
    t0 = time.monotonic()
    consumer.start()
    assert time.monotonic() - t0 < 0.2  # start() never waits for the broker
    try:
        rec.wait_count("give_up", 1, 10)
    finally:
        consumer.close()
    failed, waits = rec.of("connect_failed"), rec.of("reconnect_wait")
    assert [f.attempt for f in failed] == [0, 1, 2, 3]
    assert [w.attempt for w in waits] == [1, 2, 3]
    assert [w.delay_s for w in waits] == [1.1, pytest.approx(1.21), 1.25]
    for w, f in zip(waits, failed[1:], strict=True):
        assert w.delay_s - 0.02 <= f.t - w.t <= w.delay_s + 0.5  # it really waited that long
    assert all("refused" in (f.error or "").lower() for f in failed)
    give_up = rec.of("give_up")[0]
    assert give_up.attempt == attempts and "refused" in (give_up.error or "").lower()
    assert rec.events[-1].kind == "give_up"  # nothing after giving up, not even a stop
    assert not consumer.connected


def test_close_during_backoff_is_prompt_and_idempotent() -> None:
    creds = Credentials("leaf-y", "y", "secret", "tree", "branch", "owner")
    rec = Recorder()
    consumer = _consumer(creds, rec, port=_closed_port(), attempts=0, factor=30, max_delay=60)
    consumer.start()
    rec.wait_count("reconnect_wait", 1, 5)
    assert rec.of("reconnect_wait")[0].delay_s == 30
    t0 = time.monotonic()
    consumer.close()
    took = time.monotonic() - t0
    assert took < 1.0, took
    consumer.close()  # idempotent
    assert [e.kind for e in rec.events] == ["connect_failed", "reconnect_wait", "consumer_stopped"]


def test_close_in_the_middle_of_a_connect_is_prompt() -> None:
    silent = socket.create_server((HOST, 0))  # accepts TCP, never speaks AMQP
    try:
        creds = Credentials("leaf-z", "z", "secret", "tree", "branch", "owner")
        rec = Recorder()
        consumer = _consumer(creds, rec, port=int(silent.getsockname()[1]), attempts=0)
        consumer.start()
        time.sleep(0.3)  # the AMQP handshake is now waiting for the broker's first frame
        assert not rec.events
        t0 = time.monotonic()
        consumer.close()
        assert time.monotonic() - t0 < 1.0
        assert [e.kind for e in rec.events] == ["consumer_stopped"]
    finally:
        silent.close()


def test_wrong_password_retries_then_gives_up_saying_credentials_refused(leaf: Leaf) -> None:
    bad = Credentials(**{**leaf.credentials.to_dict(), "session_token": "wrong"})
    rec = Recorder()
    consumer = _consumer(bad, rec, attempts=2, factor=1.1, max_delay=0.2)
    consumer.start()
    try:
        rec.wait_count("give_up", 1, 10)
    finally:
        consumer.close()
    failed = rec.of("connect_failed")
    assert [f.attempt for f in failed] == [0, 1, 2]
    for e in (*failed, rec.of("give_up")[0]):
        assert "credentials refused" in (e.error or ""), e.error
        assert "wrong" not in (e.error or "")  # never the secret
    assert not rec.messages


def test_lost_tcp_stream_reconnects(leaf: Leaf) -> None:
    proxy = _TcpProxy()
    rec = Recorder()
    consumer = _consumer(leaf.credentials, rec, port=proxy.port, factor=1.1, max_delay=0.5)
    consumer.start()
    try:
        rec.wait_count("connect", 1, 10)
        proxy.drop()
        rec.wait_count("disconnect", 1, 5)
        assert "connection lost" in (rec.of("disconnect")[0].error or "")
        rec.wait_count("connect", 2, 5)
        leaf.publish(AGG)
        rec.wait(lambda: rec.messages == [AGG], 5, "the message after reconnect")
    finally:
        consumer.close()
        proxy.close()


@pytest.mark.slow
def test_missed_heartbeats_reconnect(leaf: Leaf, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _TcpProxy()
    rec = Recorder()
    consumer = _consumer(
        leaf.credentials, rec, port=proxy.port, factor=1.1, max_delay=0.5, heartbeat=1
    )
    consumer.start()
    try:
        rec.wait_count("connect", 1, 10)
        proxy.freeze()
        # pika checks every heartbeat + 5 s, so a silent peer is found within 6-12 s.
        rec.wait_count("disconnect", 1, 15)
        assert "heartbeat" in (rec.of("disconnect")[0].error or "")
        rec.wait_count("connect", 2, 5)
        leaf.publish(RUN)
        rec.wait(lambda: rec.messages == [RUN], 5, "the message after reconnect")
    finally:
        consumer.close()
        proxy.close()


def test_close_from_inside_on_message_does_not_deadlock(leaf: Leaf) -> None:
    rec = Recorder()
    holder: dict[str, AmqpConsumer] = {}

    def on_message(m: dict[str, Any]) -> None:
        rec.on_message(m)
        holder["c"].close()

    cfg = RabbitMQConfig(host=HOST, port=PORT, ssl=False)
    consumer = AmqpConsumer(leaf.credentials, cfg, HOST, on_message, EventSink(rec, "x"))
    holder["c"] = consumer
    consumer.start()
    rec.wait_count("connect", 1, 10)
    leaf.publish(AGG)
    rec.wait_count("consumer_stopped", 1, 5)
    consumer.close()
    assert rec.messages == [AGG]
    assert leaf.queue_counts() == (0, 0)  # acked before the connection closed


def test_tls_parameters_are_built_when_ssl_is_set() -> None:
    creds = Credentials("leaf-t", "t", "secret", "tree-t", "branch", "owner")
    cfg = RabbitMQConfig(host="broker.example", port=5671, ssl=True, heartbeat=30)
    consumer = AmqpConsumer(creds, cfg, "broker.example", lambda m: None, EventSink(None, "t"))
    params = consumer._params
    assert params.ssl_options is not None and params.port == 5671
    assert params.ssl_options.server_hostname == "broker.example"
    assert params.virtual_host == "tree-t" and params.heartbeat == 30
    assert params.credentials.username == "leaf-t"
    assert params.client_properties["connection_name"] == "leaf-leaf-t"
    assert params.connection_attempts == 1
    assert params.socket_timeout == _amqp.SOCKET_TIMEOUT_S
