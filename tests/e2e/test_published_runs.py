"""``bk-sim run`` with leaves on the published branchkey client, end to end.

Real envs of the published releases (built once in the suite's cache dir, shared by the
session and by the CLI subprocesses through ``BK_SIM_CLIENTS_DIR``), the real reference platform,
the real RabbitMQ, leaf runners as real processes. Small sizes: 4 leaves, 2 rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bk_sim.errors import PublishedClientError
from bk_sim.published import PublishedEnv, prepare

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scenarios" / "smoke.yaml"
SMALL = ("leaves.count=4", "leaves.processes=2", "rounds=2")

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture(scope="session")
def clients_dir(published_clients_dir: Path) -> Path:
    """The suite's one env cache (tests/conftest.py), the tests' and the subprocesses'."""
    return published_clients_dir


@pytest.fixture(scope="session")
def envs(clients_dir: Path) -> dict[str, PublishedEnv]:
    out = {}
    for req in ("branchkey==2.9.0", "branchkey==3.0.1"):
        try:
            out[req] = prepare(req, cache_dir=clients_dir)
        except PublishedClientError as exc:
            if "could not be reached" in str(exc):
                pytest.skip(f"package registry unreachable, cannot build {req}: {exc}")
            raise
    return out


def _run(
    tmp_path: Path,
    clients_dir: Path,
    *overrides: str,
    command: str = "run",
    extra: tuple[str, ...] = (),
    scenario: Path = SMOKE,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    reports = tmp_path / "reports"
    args = [sys.executable, "-m", "bk_sim.cli", command, str(scenario), *extra]
    for o in (f"report.dir={reports}", *SMALL, *overrides):
        args += ["--set", o]
    env = {**os.environ, "BK_SIM_CLIENTS_DIR": str(clients_dir)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    return proc, reports


def _only_run(reports: Path) -> Path:
    runs = sorted(reports.glob("*/results.json"))
    assert len(runs) == 1, runs
    return runs[0].parent


def _results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_2_9_0_plays_smoke_over_amqp_and_the_reference_ignores_its_numpy(
    management: Any, envs: dict[str, PublishedEnv], clients_dir: Path, tmp_path: Path
) -> None:
    proc, reports = _run(tmp_path, clients_dir, "client.implementation=branchkey==2.9.0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = _only_run(reports)
    res = _results(run_dir)
    impl = res["implementations"]["branchkey==2.9.0"]
    # 2.9.0 pins numpy 1.26.4 in its env; the harness's numpy is another: the aggregate
    # checks below passed against a reference computed only with the harness's numpy.
    assert impl["numpy"] == "1.26.4" and envs["branchkey==2.9.0"].numpy_version == "1.26.4"
    assert np.__version__ != "1.26.4"
    rounds = [c for c in res["checks"] if c["name"].endswith("aggregate correct")]
    assert len(rounds) == 2 and all(c["passed"] for c in rounds), rounds
    assert res["notifications"]["received"] == res["notifications"]["expected"] == 8
    # upload latency from the package's own session calls (published_http_request)
    assert res["timings"]["upload_latency_s"]["p50"] is not None
    events = _events(run_dir)
    notes = [e for e in events if e["kind"] == "notification" and e.get("leaf") is not None]
    assert notes and all(e["implementation"] == "branchkey==2.9.0" for e in notes)
    assert {e["transport"] for e in notes} == {"amqp"}
    blind = {u["what"] for u in impl["unobservable"]}
    assert {"amqp_heartbeats", "uploads_counted_twice"} <= blind
    assert "ws_ticket_attempts" not in blind
    assert "amqp_heartbeats" in (run_dir / "report.html").read_text()


def test_3_0_1_plays_smoke_over_websocket(
    management: Any, envs: dict[str, PublishedEnv], clients_dir: Path, tmp_path: Path
) -> None:
    proc, reports = _run(
        tmp_path, clients_dir, "client.implementation=branchkey==3.0.1", "transport=websocket"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = _results(_only_run(reports))
    impl = res["implementations"]["branchkey==3.0.1"]
    assert impl["branchkey"] == "3.0.1" and impl["transports"] == ["websocket"]
    assert "ws_ticket_attempts" in {u["what"] for u in impl["unobservable"]}
    assert res["passed"] and res["leaves"]["completed"] == 4


def test_amqp_on_3_x_is_a_one_line_refusal_naming_both(
    envs: dict[str, PublishedEnv], clients_dir: Path, tmp_path: Path
) -> None:
    proc, reports = _run(tmp_path, clients_dir, "client.implementation=branchkey==3.0.1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "'amqp'" in last and "branchkey==3.0.1" in last and "websocket only" in last
    assert "Traceback" not in proc.stderr
    assert not list(reports.glob("*/results.json"))


def test_mixed_fleet_plays_one_run_with_three_implementations(
    management: Any, envs: dict[str, PublishedEnv], clients_dir: Path, tmp_path: Path
) -> None:
    mix = "leaves.implementations={bk_sim: 0.5, 'branchkey==2.9.0': 0.25, 'branchkey==3.0.1': 0.25}"
    proc, reports = _run(tmp_path, clients_dir, mix, "transport=websocket")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = _only_run(reports)
    events = _events(run_dir)
    spawning = next(e for e in events if e["kind"] == "leaves_spawning")
    # 4 leaves at 0.5 / 0.25 / 0.25: exactly 2 / 1 / 1 (largest remainder)
    assert spawning["implementations"] == {
        "bk_sim": 2,
        "branchkey==2.9.0": 1,
        "branchkey==3.0.1": 1,
    }
    impls = _results(run_dir)["implementations"]
    assert set(impls) == {"bk_sim", "branchkey==2.9.0", "branchkey==3.0.1"}
    uploaders = {e["leaf"] for e in events if e["kind"] == "upload"}
    assert uploaders == {0, 1, 2, 3}
    for name in ("branchkey==2.9.0", "branchkey==3.0.1"):
        (leaf,) = impls[name]["leaves"]
        got = [
            e
            for e in events
            if e["kind"] == "notification" and e.get("leaf") == leaf and "implementation" in e
        ]
        assert got and {e["implementation"] for e in got} == {name}


def test_clients_writes_one_comparison_with_a_column_each(
    management: Any, envs: dict[str, PublishedEnv], clients_dir: Path, tmp_path: Path
) -> None:
    proc, reports = _run(tmp_path, clients_dir, extra=("--clients", "bk_sim,branchkey==2.9.0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = reports.glob("smoke-run-clients-*")
    doc = json.loads((folder / "comparison.json").read_text())
    assert doc["implementations"] == ["bk_sim", "branchkey==2.9.0"]
    names = [r["name"] for r in doc["rows"]]
    assert names[:3] == ["checks passed", "notifications lost", "notifications duplicated"]
    assert "wall time" in names and "uploads counted twice" in names
    checks = doc["rows"][0]
    assert checks["values"] == {"bk_sim": "5/5", "branchkey==2.9.0": "5/5"}
    assert not checks["differs"]
    for label in doc["implementations"]:
        assert doc["runs"][label]["exit_code"] == 0
        assert (Path(doc["runs"][label]["run_dir"]) / "results.json").exists()
    page = (folder / "report.html").read_text()
    assert "<th>bk_sim</th>" in page and "<th>branchkey==2.9.0</th>" in page
    assert "comparison:" in proc.stdout
