"""Notifications under Locust: 40 users in one gevent-patched process, AMQP and WebSocket.

The test owns the platform (started here) and points ``bk-sim load`` at it in remote
mode, so it can read the platform's round records and request counts afterwards.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PlatformFactory

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

USERS = 40


@pytest.mark.parametrize("transport", ["amqp", "websocket"])
def test_forty_users_in_one_process_receive_every_aggregation(
    management: Any,
    platform_factory: PlatformFactory,
    tmp_path: Path,
    unique: str,
    transport: str,
) -> None:
    handle = platform_factory(
        amqp_url="amqp://guest:guest@127.0.0.1:5672/",
        management_url="http://guest:guest@127.0.0.1:15672/",
    )
    try:
        admin = handle.admin
        tree = admin.create_tree(f"load-notify-{unique}")
        try:
            branch = admin.create_branch(tree, "b", quorum=1, round_timeout_s=1.5)["branch_id"]
            creds = admin.create_leaves(branch, USERS)
            admin.set_run_status(branch, "start")
            (tmp_path / "leaves.json").write_text(json.dumps(creds))
            scenario = {
                "name": "load_notify",
                "platform": {
                    "mode": "remote",
                    "host": handle.url,
                    "credentials_file": "leaves.json",
                },
                "broker": {"provider": "external", "amqp_url": "amqp://127.0.0.1:5672/"},
                "transport": transport,
                "leaves": {"count": USERS},
                "model": {"preset": "tiny"},
                "client": {"retry": {"max_retries": 1, "backoff_factor": 0.1}},
                "load": {
                    "users": USERS,
                    "spawn_rate": USERS,
                    "duration_s": 6,
                    "wait_min_s": 0.1,
                    "wait_max_s": 0.3,
                    "tasks": {"upload": 1, "download": 1, "metrics": 0, "branch_config": 0},
                    "aggregate_wait_s": 4,
                },
                "report": {"dir": str(tmp_path / "reports")},
            }
            path = tmp_path / "scenario.yaml"
            path.write_text(yaml.safe_dump(scenario))
            proc = subprocess.run(
                [sys.executable, "-m", "bk_sim.cli", "load", str(path)],
                capture_output=True, text=True, timeout=90, cwd=tmp_path, env=dict(os.environ),
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout + proc.stderr
            aggregated = [r for r in admin.rounds(branch) if r["status"] == "aggregated"]
            platform_stats = admin.stats()
        finally:
            admin.delete_tree(tree)
    finally:
        handle.stop()
    run_dir = next((tmp_path / "reports").glob("*/results.json")).parent
    with open(run_dir / "locust_stats.csv", newline="") as fh:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
    count = {key: int(r["Request Count"]) for key, r in rows.items()}
    kind = transport.upper()
    # Every user's consumer connected (once, no failures) inside the one Locust process.
    assert count[(kind, "connect")] == USERS
    assert not [k for k in count if k[0] == kind and k[1] != "connect"]
    if transport == "amqp":
        # The run start queued (durable queues) before the users connected reached all.
        assert count[("NOTIFY", "run_status")] == USERS
    # Every round the platform aggregated reached every user; the last may close while
    # users stop, and (WebSocket: nothing is queued) the first before all are connected.
    rounds = len(aggregated)
    assert rounds >= 3
    missed = 1 if transport == "amqp" else 2
    notified = count[("NOTIFY", "aggregation_status")]
    assert USERS * (rounds - missed) <= notified <= USERS * rounds, (notified, rounds)
    assert 0 < count[("GET", "download")] <= notified
    assert int(rows[("NOTIFY", "aggregation_status")]["Failure Count"]) == 0
    # The HTTP attempts Locust counted are the ones the platform answered.
    assert count[("POST", "upload")] == sum(platform_stats["upload"].values())
    assert count[("GET", "download")] == sum(platform_stats["download"].values())
