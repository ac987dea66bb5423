"""``bk-sim load`` end to end: real Locust, the reference platform, the real RabbitMQ.

Each test runs the real command in subprocesses (Locust must monkey-patch before anything
else, so never inside pytest) and reads the run folder: Locust's own CSVs and HTML, and
results.json with the platform's own request counts beside Locust's.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scenarios" / "load_smoke.yaml"
HTTP = ("GET", "POST")

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def _scenario(tmp_path: Path, **changes: Any) -> Path:
    """load_smoke.yaml with top-level sections updated (dicts merged one level deep)."""
    data = yaml.safe_load(SMOKE.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data["report"] = {"dir": str(tmp_path / "reports")}
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _load(args: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bk_sim.cli", "load", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ),
    )


def _run_dir(tmp_path: Path) -> Path:
    runs = sorted((tmp_path / "reports").glob("*/results.json"))
    assert runs, "no results.json written"
    return runs[-1].parent


def _csv_rows(run_dir: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(run_dir / "locust_stats.csv", newline="") as fh:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}


def _locust_http_counts(rows: dict[tuple[str, str], dict[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (kind, name), row in rows.items():
        if kind in HTTP:
            out[name] = out.get(name, 0) + int(row["Request Count"])
    return out


def _platform_counts(results: dict[str, Any]) -> dict[str, int]:
    return {k: sum(v.values()) for k, v in results["platform_requests"].items()}


def test_injected_503_shows_as_failures_and_fails_the_error_threshold(
    management: Any, tmp_path: Path
) -> None:
    scenario = _scenario(
        tmp_path,
        platform={"faults": {"http": [{"endpoint": "branch_config", "status": 503, "rate": 1.0}]}},
        client={"retry": {"max_retries": 0, "backoff_factor": 0.1, "total_timeout": 10}},
        load={**yaml.safe_load(SMOKE.read_text())["load"], "duration_s": 5, "error_rate": 0.0},
    )
    proc = _load([str(scenario)], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("FAILED: failed: threshold: error_rate")
    run_dir = _run_dir(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    rows = _csv_rows(run_dir)
    # Every branch_config attempt failed with the injected 503, and only those failed.
    bc = rows[("GET", "branch_config")]
    assert int(bc["Request Count"]) > 0
    assert bc["Failure Count"] == bc["Request Count"]
    assert results["platform_requests"]["branch_config"] == {"503": int(bc["Request Count"])}
    failed_http = sum(int(r["Failure Count"]) for (t, _), r in rows.items() if t in HTTP)
    assert failed_http == int(bc["Request Count"])
    with open(run_dir / "locust_failures.csv", newline="") as fh:
        failures = list(csv.DictReader(fh))
    assert [(f["Method"], f["Name"], f["Error"]) for f in failures if f["Method"] in HTTP] == [
        ("GET", "branch_config", "HttpAttemptFailed('HTTP 503')")
    ]
    # Locust's per-endpoint counts are exactly what the platform answered.
    assert _locust_http_counts(rows) == _platform_counts(results)
    checks = {c["name"]: c["passed"] for c in results["checks"]}
    assert checks["threshold: error_rate"] is False
    assert checks["threshold: p95_ms"] is True
    assert checks["reconciliation: Locust counted every attempt the platform answered"] is True
    assert (run_dir / "locust_report.html").read_text().count("branch_config") > 0


def test_smoke_load_passes_and_counts_match_the_platform(management: Any, tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, load={"duration_s": 5})
    proc = _load([str(scenario)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = _run_dir(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    rows = _csv_rows(run_dir)
    counts = _locust_http_counts(rows)
    assert counts == _platform_counts(results)
    for name in ("run", "upload", "download_url", "download", "metrics", "branch_config"):
        assert counts.get(name, 0) > 0, f"no {name} requests in {counts}"
    assert results["http"]["failures"] == 0
    assert results["notifications"]["aggregation_status"] > 0
    assert int(rows[("AMQP", "connect")]["Request Count"]) == 8
    assert (run_dir / "locust_stats_history.csv").stat().st_size > 0
    assert not (run_dir / "payloads").exists() and not (run_dir / "downloads").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_master_and_two_workers_merge_their_stats(management: Any, tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, load={"duration_s": 5})
    port = str(_free_port())
    env = dict(os.environ)
    base = [sys.executable, "-m", "bk_sim.cli", "load", str(scenario)]
    master = subprocess.Popen(
        [*base, "--master", "--master-bind-host", "127.0.0.1", "--master-port", port,
         "--expect-workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    workers = [
        subprocess.Popen(
            [*base, "--worker", "--master-host", "127.0.0.1", "--master-port", port],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            env=env,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        out, err = master.communicate(timeout=90)
        worker_out = [w.communicate(timeout=30)[0] for w in workers]
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
    assert master.returncode == 0, out + err
    assert all(w.returncode == 0 for w in workers), worker_out
    # Each worker got its own share of leaves from the master.
    assert all("worker: 5 leaves on http://127.0.0.1:" in o for o in worker_out), worker_out
    run_dir = _run_dir(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["run"]["role"] == "master" and results["run"]["workers"] == 2
    rows = _csv_rows(run_dir)
    # The master's table merges both workers: 8 users' connects (4 per worker), and the
    # HTTP attempts both workers made are exactly what the platform answered.
    assert int(rows[("AMQP", "connect")]["Request Count"]) == 8
    assert results["client"]["transport.connect"] == 8
    counts = _locust_http_counts(rows)
    assert counts["upload"] > 0
    assert counts == _platform_counts(results)


def test_an_existing_run_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    proc = _load([str(SMOKE), "--run-dir", str(taken)], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # was 1 (= a check failed)
    assert f"bk-sim: {taken}: the run folder already exists\n" == proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("role", ["--web", "--master"])
def test_a_taken_web_or_master_port_is_a_one_line_error_not_a_hang(
    management: Any, tmp_path: Path, role: str
) -> None:
    """The web UI's bind failure used to leave the run waiting forever; the master's was
    an RPCError traceback with exit code 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = (
            ["--web", "--web-port", port]
            if role == "--web"
            else ["--master", "--master-bind-host", "127.0.0.1", "--master-port", port]
        )
        proc = _load([str(SMOKE), *args, "--run-dir", str(tmp_path / "run")], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bk-sim: Locust ") and f"127.0.0.1:{port}" in last, last
    assert "in use" in last, last


def test_a_worker_without_a_master_gives_up_in_one_line(tmp_path: Path) -> None:
    """Locust raises ConnectionError after its retries (5 minutes; cut short here)."""
    script = (
        "import locust, sys\n"  # gevent patches first, as bk-sim load's re-exec does
        "import locust.runners as lr\n"
        "lr.CONNECT_RETRY_COUNT, lr.CONNECT_TIMEOUT = 1, 0.2\n"
        "from bk_sim.cli import main\n"
        "main(prog_name='bk-sim', args=['load', sys.argv[1], '--worker', '--master-port', "
        "sys.argv[2]])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(SMOKE), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bk-sim: Locust worker: no master answered on 127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr
