"""``bk-sim bench round``: the floor and the real round in one invocation (real platform,
real RabbitMQ). Only the document's shape and consistency are asserted: the figures are
measured, never enforced by a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_bench_round_json_has_wall_floor_and_their_ratio(management: Any, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bk_sim.cli",
            "bench",
            "round",
            "--scenario",
            str(ROOT / "scenarios" / "smoke.yaml"),
            "--set",
            f"report.dir={tmp_path}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["leaves"] == 8 and doc["run_passed"] is True
    parts = doc["parts_s"]
    for name in ("generate", "compress", "hash", "check", "aggregate", "notify", "download"):
        assert parts[name] > 0, (name, parts)
    assert doc["floor_s"] > 0 and doc["wall_s"] > 0
    assert doc["ratio"] == pytest.approx(doc["wall_s"] / doc["floor_s"])
    assert sum(doc["phases_s"].values()) == pytest.approx(doc["wall_s"], rel=1e-6)
