"""Fixtures for tests that need a running reference platform."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.platform import PlatformHandle, start_platform


@pytest.fixture(scope="module")
def platform(
    management: ManagementAPI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PlatformHandle]:
    """A reference platform on the real broker, shared by one test module.

    Modules that need other settings (limits, no broker) define their own ``platform``.
    """
    handle = start_platform(tmp_path_factory.mktemp("platform"))
    yield handle
    handle.stop()
