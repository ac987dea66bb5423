"""The testcontainers broker end to end: start, connect, restart (volume kept), reconnect, stop.

Needs a Docker engine; where none answers, every test is skipped saying so (never passed).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pika
import pytest

from bk_sim.broker import (
    BrokerEndpoints,
    ManagementAPI,
    check_socket_capacity,
    docker_available,
    provide_broker,
    restart_broker,
)
from bk_sim.broker import _provider as provider_mod

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def docker_daemon() -> Iterator[None]:
    ok, why = docker_available()
    if not ok:
        pytest.skip(f"no Docker daemon answered: {why}")
    yield


def _container_exists(container_id: str) -> bool:
    import docker

    client = docker.from_env()
    try:
        client.containers.get(container_id)
        return True
    except docker.errors.NotFound:
        return False
    finally:
        client.close()


def _publish(endpoints: BrokerEndpoints, queue: str, body: bytes) -> None:
    assert endpoints.amqp_url is not None
    connection = pika.BlockingConnection(pika.URLParameters(endpoints.amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue, durable=True)
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    connection.close()


def _get(endpoints: BrokerEndpoints, queue: str) -> bytes | None:
    assert endpoints.amqp_url is not None
    connection = pika.BlockingConnection(pika.URLParameters(endpoints.amqp_url))
    _method, _props, body = connection.channel().basic_get(queue, auto_ack=True)
    connection.close()
    return body


def test_container_broker_restarts_keeping_its_data(docker_daemon: None, unique: str) -> None:
    seen: list[str] = []
    queue = f"bk-sim-restart-{unique}"
    with provide_broker("testcontainers", on_status=seen.append) as endpoints:
        assert endpoints.provider == "testcontainers" and endpoints.restartable
        assert endpoints.reason.startswith("testcontainers: asked for, so a throwaway")
        assert endpoints._container is not None
        container_id = endpoints._container.container_id
        _publish(endpoints, queue, b"before restart")

        after = restart_broker(endpoints, on_status=seen.append)

        if endpoints._container._stable_ports:  # Docker on this machine: same URLs
            assert after.amqp_url == endpoints.amqp_url
            assert after.management_url == endpoints.management_url
        assert _get(after, queue) == b"before restart"  # durable message kept (volume)
        assert after.management_url is not None
        api = ManagementAPI(after.management_url)
        assert "rabbitmq_version" in api.overview()
        api.close()
        check_socket_capacity(after, 1000)  # the container runs with a high nofile limit
    assert any("restarting container" in line for line in seen)
    assert not _container_exists(container_id)


def test_auto_falls_back_to_a_container_and_removes_it_on_error(
    docker_daemon: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BK_SIM_AMQP_URL", raising=False)
    monkeypatch.delenv("BK_SIM_MANAGEMENT_URL", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setattr(provider_mod, "LOCAL_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{closed}/")
    container_id = ""
    with pytest.raises(RuntimeError, match="boom"):
        with provide_broker() as endpoints:
            assert endpoints.provider == "testcontainers"
            assert f"nothing listening on 127.0.0.1:{closed}" not in endpoints.reason
            assert "no broker configured or listening on" in endpoints.reason
            assert endpoints._container is not None
            container_id = endpoints._container.container_id
            raise RuntimeError("boom")
    assert container_id and not _container_exists(container_id)
