"""Shared fixtures: the real RabbitMQ and the one platform factory.

Without RabbitMQ the tests that need it skip, saying why; with ``CI=true`` they fail
instead, so CI never passes green with them unrun.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.errors import BrokerError
from bk_sim.platform import PlatformHandle, start_platform
from bk_sim.published import CACHE_ENV_VAR
from tests.support import unavailable

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
    """The real broker's management API; skips (saying why) when it is not reachable, and
    fails under CI=true."""
    if not _port_open(AMQP_HOST, AMQP_PORT):
        unavailable(
            "RabbitMQ is not listening on 127.0.0.1:5672 (start: rabbitmq-server -detached)"
        )
    api = ManagementAPI(MANAGEMENT_URL)
    try:
        api.overview()
    except BrokerError as exc:
        unavailable(f"RabbitMQ management API unavailable: {exc}")
    yield api
    api.close()


@pytest.fixture(scope="session", autouse=True)
def published_clients_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Where ``bk_sim.published.prepare`` keeps the published clients' envs for the whole
    suite: ``$BK_SIM_CLIENTS_DIR`` when set, else a folder of the pytest cache (kept across
    sessions). Set in the environment, so every test (and every ``bk-sim`` subprocess)
    builds each release once."""
    given = os.environ.get(CACHE_ENV_VAR)
    if given:
        yield Path(given)
        return
    cache = getattr(request.config, "cache", None)
    path = (
        Path(cache.mkdir("bk-sim-clients"))
        if cache is not None
        else tmp_path_factory.mktemp("bk-sim-clients")
    )
    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_ENV_VAR, str(path))
    yield path
    patch.undo()


@pytest.fixture()
def unique() -> str:
    """A short unique suffix for names on the shared broker."""
    return uuid.uuid4().hex[:12]


PlatformFactory = Callable[..., PlatformHandle]


@pytest.fixture(scope="module")
def platform_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformFactory]:
    """Starts reference platforms (``start_platform`` keywords: limits, ``no_amqp``, ...),
    each in its own data folder; every one is stopped when the module's tests are done.
    A test may stop (or restart) its platform earlier itself."""
    handles: list[PlatformHandle] = []

    def make(**settings: Any) -> PlatformHandle:
        handle = start_platform(tmp_path_factory.mktemp("platform"), **settings)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()
