"""platform.tls in a scenario: where it applies and where it is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bk_sim.errors import ScenarioError
from bk_sim.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def test_tls_smoke_asks_for_tls_on_the_local_platform() -> None:
    sc = load_scenario(SCENARIOS / "tls_smoke.yaml")
    assert sc.platform.tls is True
    assert sc.platform.mode == "local"


def test_tls_with_the_event_loop_host_is_refused_with_its_key() -> None:
    with pytest.raises(ScenarioError, match=r"platform\.tls: needs leaves\.host 'threads'"):
        load_scenario(SCENARIOS / "tls_smoke.yaml", overrides=["leaves.host=event_loop"])


def test_tls_with_a_published_client_is_refused_with_its_key() -> None:
    with pytest.raises(ScenarioError, match=r"platform\.tls: needs bk-sim's own client"):
        load_scenario(
            SCENARIOS / "tls_smoke.yaml", overrides=["client.implementation=branchkey==2.9.0"]
        )
