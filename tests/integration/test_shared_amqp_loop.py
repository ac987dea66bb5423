"""Many AMQP consumers on one shared pika loop, against the real RabbitMQ.

The event-loop leaf host puts every leaf's consumer of a process on one ``IOLoop``
thread and lets at most ``max_opening`` connections handshake at once: every consumer
still connects (the queued ones when their turn comes), each message is delivered, and
closing them ends each one without stopping the loop for the others.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pika
import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.client import SharedAmqpLoop
from bk_sim.client._config import Credentials, RabbitMQConfig, WebSocketConfig
from bk_sim.client._consumer import ConsumerSpec
from bk_sim.client._events import EventSink
from tests.support import Recorder

pytestmark = [pytest.mark.rabbitmq]

HOST = "127.0.0.1"


@pytest.fixture()
def creds(management: ManagementAPI, unique: str) -> Iterator[Credentials]:
    c = Credentials(
        id=f"shared-leaf-{unique}",
        name="shared loop leaf",
        session_token=f"token-{unique}",
        owner_id=f"owner-{unique}",
        tree_id=f"shared-tree-{unique}",
        branch_id=f"shared-branch-{unique}",
    )
    management.create_vhost(c.tree_id)
    try:
        management.set_permissions(c.tree_id, "guest", ".*", ".*", ".*")
        management.create_user(c.id, c.session_token)
        management.set_permissions(c.tree_id, c.id, configure="", write="", read=f"^{c.id}$")
        management.declare_exchange(c.tree_id, c.branch_id, "fanout")
        management.declare_queue(c.tree_id, c.id)
        management.bind(c.tree_id, c.branch_id, c.id)
        yield c
    finally:
        management.delete_vhost(c.tree_id)
        management.delete_user(c.id)


def test_consumers_queued_for_their_handshake_all_connect_and_close(
    creds: Credentials,
) -> None:
    rec = Recorder()
    loop = SharedAmqpLoop(max_opening=2)
    cfg = RabbitMQConfig(host=HOST, port=5672, ssl=False, max_reconnect_attempts=3)
    threads_before = threading.active_count()
    spec = ConsumerSpec(
        transport="amqp",
        credentials=creds,
        rabbitmq=cfg,
        broker_host=HOST,
        websocket=WebSocketConfig(),
        websocket_url="",
        verify_ssl=False,
        get_ticket=dict,
        on_message=rec.on_message,
        events=EventSink(rec, creds.id),
    )
    consumers = [loop.factory(spec) for _ in range(7)]
    try:
        for c in consumers:
            c.start()
        rec.wait_count("connect", 7, timeout=30)
        assert threading.active_count() == threads_before, "a consumer started a thread"
        assert all(c.connected for c in consumers)
        conn = pika.BlockingConnection(
            pika.ConnectionParameters(
                HOST, 5672, creds.tree_id, pika.PlainCredentials("guest", "guest")
            )
        )
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            body = {"message_type": "aggregation_status", "body": {"aggregation_id": "a1"}}
            ch.basic_publish(creds.branch_id, "", json.dumps(body).encode())
        finally:
            conn.close()
        rec.wait_messages(1, timeout=10)
        for c in consumers[:3]:
            c.close()
        assert not any(c.connected for c in consumers[:3])
        assert all(c.connected for c in consumers[3:]), "closing some stopped the others"
    finally:
        for c in consumers:
            c.close()
        loop.close()
    rec.wait_count("consumer_stopped", 7, timeout=10)
    assert not rec.of("give_up")
