"""``leaves.host: event_loop`` end to end: real leaf processes, platform and RabbitMQ.

The event-loop host must be a drop-in for the thread host: the same plans give the same
uploads (digests), the same events and the same verdict; a dying leaf's process is still
SIGKILLed without its clients closing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scenarios" / "smoke.yaml"

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def _run(tmp_path: Path, name: str, *overrides: str) -> tuple[int, Path, str]:
    reports = tmp_path / name
    args = [sys.executable, "-m", "bk_sim.cli", "run", str(SMOKE)]
    for o in (f"report.dir={reports}", *overrides):
        args += ["--set", o]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=dict(os.environ)
    )
    (run_dir,) = [p.parent for p in reports.glob("*/results.json")]
    return proc.returncode, run_dir, proc.stdout + proc.stderr


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_event_loop_host_gives_the_thread_hosts_uploads_events_and_verdict(
    management: Any, tmp_path: Path
) -> None:
    rc_t, threads, out_t = _run(tmp_path, "threads", "leaves.host=threads")
    rc_e, loop, out_e = _run(tmp_path, "loop", "leaves.host=event_loop")
    assert rc_t == 0, out_t
    assert rc_e == 0, out_e
    res_t = json.loads((threads / "results.json").read_text())
    res_e = json.loads((loop / "results.json").read_text())
    assert [(c["name"], c["passed"]) for c in res_e["checks"]] == [
        (c["name"], c["passed"]) for c in res_t["checks"]
    ]
    ev_t, ev_e = _events(threads), _events(loop)

    def uploads(events: list[dict[str, Any]]) -> dict[tuple[int, int], str]:
        return {(e["leaf"], e["round"]): e["digest"] for e in events if e["kind"] == "upload"}

    assert uploads(ev_e) == uploads(ev_t)
    assert len(uploads(ev_e)) == 16

    def kinds(events: list[dict[str, Any]]) -> Counter[str]:
        return Counter(e["kind"] for e in events if e["kind"] != "retry_wait")

    assert kinds(ev_e) == kinds(ev_t)
    assert res_e["notifications"]["received"] == res_e["notifications"]["expected"] == 16


def test_event_loop_host_still_kills_a_dying_leafs_process(management: Any, tmp_path: Path) -> None:
    rc, run_dir, out = _run(
        tmp_path,
        "dying",
        "leaves.host=event_loop",
        "leaves.dropouts.die_fraction=0.25",
        "rounds=1",
        "platform.quorum=6",
        "platform.round_timeout_s=3",
    )
    assert rc == 0, out
    events = _events(run_dir)
    died = {e["leaf"] for e in events if e["kind"] == "leaf_died"}
    closed = {e["leaf"] for e in events if e["kind"] == "leaf_closed"}
    assert len(died) == 2 and not died & closed, "a dying leaf closed its client"
    killed = [e for e in events if e["kind"] == "worker_exit" and e["exitcode"] == -9]
    assert killed, "no leaf process was killed"
