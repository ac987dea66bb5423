"""Chaos against the real broker: the platform's publisher across a broker outage, the
broker-restart path (testcontainers only), and the proxy in front of RabbitMQ.

The shared broker on this machine is never stopped here (other engineers' tests use it):
an outage is made by taking the chaos proxy between the publisher and the broker away and
bringing it back on the same port, which is what a broker restart looks like from the
publisher's side (connections dropped, then refused, then accepted again).
"""

from __future__ import annotations

import socket
import time
from concurrent import futures
from typing import Any

import pika
import pytest

from bk_sim.broker import docker_available
from bk_sim.chaos import ToxicProxy
from bk_sim.platform._notify import AmqpPublisher

pytestmark = pytest.mark.rabbitmq


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _count(vhost: str, queue: str) -> int:
    params = pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/")
    params.virtual_host = vhost
    conn = pika.BlockingConnection(params)
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return int(ok.method.message_count)
    finally:
        conn.close()


def test_publisher_survives_a_broker_outage(management: Any, unique: str) -> None:
    vhost, exchange, queue = f"chaos-{unique}", f"ex-{unique}", f"q-{unique}"
    management.create_vhost(vhost)
    try:
        management.set_permissions(vhost, "guest", ".*", ".*", ".*")
        management.declare_exchange(vhost, exchange, "fanout")
        management.declare_queue(vhost, queue)
        management.bind(vhost, exchange, queue)
        port = _free_port()
        proxy = ToxicProxy("127.0.0.1", 5672, listen_port=port)
        proxy.start()
        publisher = AmqpPublisher(f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        publisher.start()
        try:
            publisher.publish(vhost, exchange, "", b'{"n": 1}').result(timeout=10)
            proxy.stop()  # the "broker" goes away: connections drop, new ones are refused
            pending = publisher.publish(vhost, exchange, "", b'{"n": 2}')
            # Not a sleep: returns at once (and fails) if the publish is confirmed anyway.
            futures.wait([pending], timeout=2.0)
            assert not pending.done(), "a publish cannot be confirmed while the broker is away"
            proxy = ToxicProxy("127.0.0.1", 5672, listen_port=port)
            proxy.start()
            t0 = time.monotonic()
            pending.result(timeout=20)
            recovered = time.monotonic() - t0
        finally:
            publisher.stop()
            proxy.stop()
        assert recovered < 10.0
        assert _count(vhost, queue) == 2  # both on disk in the broker, none lost
    finally:
        management.delete_vhost(vhost)


@pytest.mark.docker
@pytest.mark.slow
def test_broker_restart_scenario_on_a_throwaway_broker(tmp_path: Any) -> None:
    ok, why = docker_available()
    if not ok:
        pytest.skip(
            f"needs Docker for a broker this test may restart ({why}); the shared local "
            "broker is never restarted by tests"
        )
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bk_sim.cli",
            "chaos",
            str(root / "scenarios/broker_restart.yaml"),
            "--set",
            f"report.dir={tmp_path}",
            "--set",
            "broker.provider=testcontainers",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "broker-restart" in proc.stdout
