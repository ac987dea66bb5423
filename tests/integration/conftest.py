"""Fixtures for tests that need a running reference platform."""

from __future__ import annotations

import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.platform import PlatformHandle
from tests.conftest import PlatformFactory


@pytest.fixture(scope="module")
def platform(management: ManagementAPI, platform_factory: PlatformFactory) -> PlatformHandle:
    """A reference platform on the real broker, shared by one test module.

    Modules that need other settings (limits, no broker) override ``platform`` with
    ``platform_factory(**settings)``.
    """
    return platform_factory()
