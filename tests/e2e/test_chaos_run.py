"""``bk-sim chaos`` end to end against the real RabbitMQ, platform and leaf processes.

Each test plays a small scenario with one kind of fault and checks, from what the run
left behind, that the leaves noticed, recovered and lost nothing. Heartbeats, backoffs
and timeouts are small so the whole file runs in about a minute on 2 cores.
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

from bk_sim.chaos import ChaosRun
from bk_sim.engine import RunResult
from bk_sim.scenario import scenario_from_dict
from bk_sim.sim import SimulationRun

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

FACTOR, MAX_DELAY = 1.2, 3.0


def _scenario(tmp_path: Path, faults: list[dict[str, Any]], **over: Any) -> Any:
    # Faults on connections come from round 2 on: in round 1 a leaf may upload (and the
    # round close) before its consumer has connected at all.
    data: dict[str, Any] = {
        "name": "chaos_e2e",
        "seed": 3,
        "platform": {"mode": "local", "faults": {"notifications": {"delay_s": 1.5}}},
        "leaves": {"count": 6, "processes": 2},
        "model": {"preset": "tiny"},
        "rounds": 2,
        "timeouts": {"notification_s": 45, "run_s": 120},
        "client": {
            "retry": {"max_retries": 5, "backoff_factor": 0.1, "total_timeout": 10},
            "reconnect": {
                "max_attempts": 0,
                "backoff_factor": FACTOR,
                "max_delay": MAX_DELAY,
                "heartbeat": 2,
            },
        },
        "report": {"dir": str(tmp_path / "reports")},
        "chaos": {"faults": faults, "expect": {"max_reconnect_s": 25}},
    }
    for key, value in over.items():
        data[key] = value
    return scenario_from_dict(data)


def _run(scenario: Any) -> tuple[RunResult, list[dict[str, Any]]]:
    result = SimulationRun(scenario, hooks=ChaosRun(scenario)).execute()
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    return result, events


def _fault(results: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(f for f in results["chaos"]["faults"] if f["kind"] == kind)


def _notifications_per_leaf(events: list[dict[str, Any]]) -> Counter[tuple[int, str]]:
    return Counter(
        (e["leaf"], e["value"])
        for e in events
        if e["kind"] == "notification" and e.get("message_type") == "aggregation_status"
    )


def test_connection_kills_and_a_lost_channel_during_the_wait(
    management: Any, tmp_path: Path
) -> None:
    sc = _scenario(
        tmp_path,
        [
            {"kind": "kill_connections", "round": 2, "when": "awaiting_aggregate"},
            {"kind": "close_channel", "round": 3, "when": "awaiting_aggregate", "leaves": 0.5},
        ],
        rounds=3,
    )
    result, events = _run(sc)
    r = result.results
    assert result.passed, r["verdict"]
    kill = _fault(r, "kill_connections")
    assert kill["disconnected"] == 6 and kill["reconnected"] == 6
    for row in kill["per_leaf"]:
        assert "320 CONNECTION_FORCED" in row["error"]
        assert row["detect_s"] < 1.0
        # The backoff bound: the waits taken, each min(factor^n, max_delay), plus a connect.
        assert all(w["delay_s"] == min(FACTOR ** w["attempt"], MAX_DELAY) for w in row["waits"])
        assert row["reconnect_s"] <= sum(w["delay_s"] for w in row["waits"]) + 1.5
    # Every aggregate reached every leaf's application exactly once.
    aggs = [x["aggregation_id"] for x in r["rounds"]]
    got = _notifications_per_leaf(events)
    assert got == Counter({(leaf, a): 1 for leaf in range(6) for a in aggs})
    # The channel-level loss: the broker cancelled the consumer; each hit leaf says it is
    # consuming again (a connect event after its disconnect) and none died silently.
    lost = _fault(r, "close_channel")
    assert len(lost["leaves"]) == 3 and lost["disconnected"] == 3 and lost["reconnected"] == 3
    for row in lost["per_leaf"]:
        assert "consumer cancelled by the broker" in row["error"]
        later = [
            e
            for e in events
            if e["kind"] == "connect" and e.get("leaf") == row["leaf"] and e["t"] > lost["start_t"]
        ]
        assert later, f"leaf {row['leaf']} never said it was consuming again"
    assert not [e for e in events if e["kind"] in ("give_up", "leaf_error")]
    assert sum(1 for e in events if e["kind"] == "leaf_done") == 6
    kinds = [e["kind"] for e in events]
    assert kinds.count("fault_start") == 2 and kinds.count("fault_end") == 2


def test_a_blackhole_longer_than_the_heartbeat_is_detected_by_heartbeat(
    management: Any, tmp_path: Path
) -> None:
    stall = 16.0  # > 2 x (heartbeat + 5): pika's worst case for noticing a silent peer
    sc = _scenario(
        tmp_path,
        [{"kind": "blackhole", "round": 2, "when": "awaiting_aggregate", "duration_s": stall}],
        leaves={"count": 4, "processes": 2},
    )
    result, events = _run(sc)
    r = result.results
    assert result.passed, r["verdict"]
    assert r["chaos"]["proxy"]["connections_accepted"] >= 4
    assert r["chaos"]["proxy"]["bytes_swallowed"] > 0
    hole = _fault(r, "blackhole")
    assert hole["disconnected"] == 4 and hole["reconnected"] == 4
    for row in hole["per_leaf"]:
        # Noticed through missed heartbeats while the stall lasted, not at its end.
        assert row["error"].startswith("missed heartbeats"), row["error"]
        assert row["detect_s"] < stall
    got = _notifications_per_leaf(events)
    assert sorted(got.values()) == [1] * 8  # 4 leaves x 2 rounds, each once


def _retry_leaves(events: list[dict[str, Any]]) -> set[int]:
    return {
        e["leaf"]
        for e in events
        if e["kind"] == "retry_wait" and e.get("endpoint") == "upload" and "status" not in e
    }


def test_dropped_upload_answers_are_counted_once_by_the_platform(
    management: Any, tmp_path: Path
) -> None:
    """Through the CLI, with the shipped retry_storm scenario made smaller."""
    reports = tmp_path / "reports"
    args = [sys.executable, "-m", "bk_sim.cli", "chaos", str(ROOT / "scenarios/retry_storm.yaml")]
    for o in (f"report.dir={reports}", "leaves.count=6", "leaves.processes=2"):
        args += ["--set", o]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "chaos:" in proc.stdout and "lost-answers" in proc.stdout
    (run_dir,) = [p.parent for p in reports.glob("*/results.json")]
    r = json.loads((run_dir / "results.json").read_text())
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert _retry_leaves(events), "no upload answer was dropped"
    assert r["chaos"]["uploads"]["double_counted"] == []
    assert all(row["passed"] for row in r["rounds"])
    lost = next(f for f in r["chaos"]["faults"] if f["name"] == "lost-answers")
    assert lost["retried_uploads"], "the dropped answers made no leaf retry"
    assert all(u["counted"] == 1 for u in lost["retried_uploads"]), lost["retried_uploads"]
    throttle = next(f for f in r["chaos"]["faults"] if f["name"] == "throttle")
    assert set(throttle["http_retries"]) <= {"upload 429"}


def test_without_platform_dedupe_the_double_count_is_reported_by_leaf(
    management: Any, tmp_path: Path
) -> None:
    sc = _scenario(
        tmp_path,
        [
            {
                "kind": "http",
                "round": 1,
                "when": "round_start",
                "duration_s": 8,
                "http": {"endpoint": "upload", "drop_response": True, "count": 2},
            }
        ],
        leaves={"count": 4, "processes": 2},
        rounds=1,
        platform={"mode": "local", "faults": {"dedupe": False}},
    )
    result, events = _run(sc)
    r = result.results
    assert not result.passed
    retried = _retry_leaves(events)
    assert len(retried) == 2
    doubles = r["chaos"]["uploads"]["double_counted"]
    assert {d["leaf"] for d in doubles} == retried
    check = next(c for c in r["checks"] if c["name"] == "chaos: at most 0 uploads counted twice")
    assert not check["passed"]
    for d in doubles:
        assert f"leaf {d['leaf']} ({d['leaf_id']}) counted 2 times" in check["message"]
    (drop,) = r["chaos"]["faults"]
    assert {u["leaf"] for u in drop["retried_uploads"]} == retried
    assert all(u["counted"] == 2 for u in drop["retried_uploads"]), drop["retried_uploads"]


def test_a_leaf_process_killed_mid_round(management: Any, tmp_path: Path) -> None:
    sc = _scenario(
        tmp_path,
        [{"kind": "kill_leaf", "round": 2, "when": "round_start", "leaves": 0.1, "restart": True}],
        leaves={"count": 6, "processes": 3},
        rounds=3,
        platform={
            "mode": "local",
            "quorum": 4,
            "round_timeout_s": 6,  # the restarted process must upload round 3 in time
            "faults": {"notifications": {"delay_s": 1.0}},
        },
    )
    result, events = _run(sc)
    r = result.results
    assert result.passed, r["verdict"]
    killed = r["chaos"]["killed"]
    assert len(killed) == 2  # one process of three hosts two leaves
    dead = {k["leaf"] for k in killed}
    assert all(k["reason"].startswith("chaos: process") for k in killed)
    by_round = {row["round"]: row for row in r["rounds"]}
    assert by_round[2]["close_reason"] == "timeout_quorum" and by_round[2]["uploads"] == 4
    assert all(row["passed"] for row in r["rounds"])
    # The others were unaffected: each got each aggregate once and finished.
    got = _notifications_per_leaf(events)
    aggs = [row["aggregation_id"] for row in r["rounds"]]
    for leaf in set(range(6)) - dead:
        assert [got[(leaf, a)] for a in aggs] == [1, 1, 1]
    # The killed leaves came back for round 3 and played it.
    assert r["chaos"]["restarted"][0]["first_round"] == 3
    round3 = {e["leaf"] for e in events if e["kind"] == "upload" and e["round"] == 3}
    assert dead <= round3
    assert sum(1 for e in events if e["kind"] == "leaf_done") == 6
