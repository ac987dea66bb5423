"""platform.tls in a scenario: where it applies and where it is refused with a clear error."""

from __future__ import annotations

import subprocess
import sys
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


def test_load_refuses_a_tls_scenario_naming_why(tmp_path: Path) -> None:
    """Through the CLI: importing the load package's run module imports Locust (gevent)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bk_sim.cli",
            "load",
            str(SCENARIOS / "load_smoke.yaml"),
            "--set",
            "platform.tls=true",
            "--set",
            f"report.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "platform.tls: bk-sim load does not run over TLS" in last
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
