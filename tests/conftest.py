"""Shared fixtures: the real RabbitMQ (skipped with a reason when it is not there)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.errors import BrokerError

AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672
MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def management() -> Iterator[ManagementAPI]:
    """The real broker's management API; skips (saying why) when it is not reachable."""
    if not _port_open(AMQP_HOST, AMQP_PORT):
        pytest.skip(
            "RabbitMQ is not listening on 127.0.0.1:5672 (start: rabbitmq-server -detached)"
        )
    api = ManagementAPI(MANAGEMENT_URL)
    try:
        api.overview()
    except BrokerError as exc:
        pytest.skip(f"RabbitMQ management API unavailable: {exc}")
    yield api
    api.close()


@pytest.fixture()
def unique() -> str:
    """A short unique suffix for names on the shared broker."""
    return uuid.uuid4().hex[:12]
