"""``bk-sim run`` end to end through the CLI, against the real RabbitMQ.

Each test runs the real command in a subprocess (leaf processes, the reference platform,
the broker) and reads what the run left in its folder.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scenarios" / "smoke.yaml"

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def _run(
    tmp_path: Path, *overrides: str, scenario: Path = SMOKE, timeout: float = 240
) -> tuple[subprocess.CompletedProcess[str], Path | None]:
    reports = tmp_path / "reports"
    args = [sys.executable, "-m", "bk_sim.cli", "run", str(scenario)]
    for o in (f"report.dir={reports}", *overrides):
        args += ["--set", o]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=dict(os.environ)
    )
    runs = sorted(reports.glob("*/results.json")) if reports.exists() else []
    return proc, runs[-1].parent if runs else None


def _results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _heaviest_leaf(events: Sequence[dict[str, Any]], round_index: int) -> int:
    """The leaf apply_bug picks: largest weighting among the round's uploads."""
    ups = [e for e in events if e["kind"] == "upload" and e["round"] == round_index]
    best = max(ups, key=lambda e: (e["weighting"], [-ord(c) for c in e["leaf_id"]]))
    return int(best["leaf"])


def test_smoke_scenario_passes_end_to_end(management: Any, tmp_path: Path) -> None:
    proc, run_dir = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_dir is not None
    assert proc.stdout.startswith("PASSED")
    results = _results(run_dir)
    assert results["passed"] is True
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["passed"] and r["uploads"] == 8 for r in results["rounds"])
    assert all(r["max_rel_error"] is not None for r in results["rounds"])
    n = results["notifications"]
    assert n["expected"] == 16 and n["received"] == 16 and n["lost"] == 0
    assert n["duplicates"] == 0
    for key in ("upload_latency_s", "notification_latency_s"):
        assert results["timings"][key]["p50"] is not None
    # Secrets: credentials file private, tokens nowhere in what the run wrote.
    creds = json.loads((run_dir / "leaves.json").read_text())
    assert stat.S_IMODE((run_dir / "leaves.json").stat().st_mode) == 0o600
    tokens = [c["session_token"] for c in creds]
    for name in ("events.jsonl", "results.json"):
        text = (run_dir / name).read_text()
        assert not any(t in text for t in tokens), f"a session token leaked into {name}"
    assert not any(t in proc.stdout + proc.stderr for t in tokens)


def test_dying_leaves_lose_their_process_and_amqp_url_picks_the_broker(
    management: Any, tmp_path: Path
) -> None:
    """die_fraction: a dying leaf's process is SIGKILLed mid-run (no clean close);
    --amqp-url / --management-url: the run uses the external broker at those URLs."""
    reports = tmp_path / "reports"
    args = [sys.executable, "-m", "bk_sim.cli", "run", str(SMOKE)]
    for o in (
        f"report.dir={reports}",
        "leaves.dropouts.die_fraction=0.25",
        "rounds=1",  # both die in round 1: one process to kill, and a short run
        "platform.quorum=6",
        "platform.round_timeout_s=3",
    ):
        args += ["--set", o]
    args += ["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/"]
    args += ["--management-url", "http://guest:guest@127.0.0.1:15672/"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = [p.parent for p in reports.glob("*/results.json")]
    results = _results(run_dir)
    assert results["scenario"]["broker"]["provider"] == "external"
    assert results["scenario"]["broker"]["amqp_url"] == "amqp://guest:***@127.0.0.1:5672/"
    assert results["leaves"]["died_as_planned"] == 2
    events = _events(run_dir)
    died = {e["leaf"] for e in events if e["kind"] == "leaf_died"}
    closed = {e["leaf"] for e in events if e["kind"] == "leaf_closed"}
    assert len(died) == 2 and not died & closed, "a dying leaf closed its client"
    killed = [e for e in events if e["kind"] == "worker_exit" and e["exitcode"] == -9]
    assert killed, "no leaf process was killed"


@pytest.mark.parametrize("bug", ["unweighted", "drop_leaf", "double_count"])
def test_harness_catches_the_platforms_aggregation_bugs(
    management: Any, tmp_path: Path, bug: str
) -> None:
    proc, run_dir = _run(tmp_path, f"platform.faults.aggregation={bug}", "rounds=1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert run_dir is not None
    results = _results(run_dir)
    (row,) = results["rounds"]
    assert row["passed"] is False
    f = row["forensics"]
    events = _events(run_dir)
    victim = _heaviest_leaf(events, 1)
    victim_id = next(e["leaf_id"] for e in events if e.get("leaf") == victim and "leaf_id" in e)
    if bug == "unweighted":
        assert f["unweighted"] is True
        assert "weight" in f["summary"].lower()
    elif bug == "drop_leaf":
        assert f["dropped"] == [victim_id]
        assert f"leaf {victim} (" in f["summary"].lower()
    else:
        assert f["double_counted"] == [victim_id]
        assert f"leaf {victim} (" in f["summary"].lower()
    assert "FAILED" in proc.stdout


def test_harness_catches_a_stale_aggregate(management: Any, tmp_path: Path) -> None:
    proc, run_dir = _run(tmp_path, "platform.faults.aggregation=stale", "timeouts.notification_s=6")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert run_dir is not None
    rounds = _results(run_dir)["rounds"]
    assert rounds[0]["passed"] is True
    assert rounds[1]["passed"] is False
    assert rounds[1]["forensics"]["stale_round"] == 1
    assert "round 1" in rounds[1]["reason"]


def test_an_aggregate_no_leaf_downloaded_is_still_validated(
    management: Any, tmp_path: Path
) -> None:
    """Every notification dropped: no leaf downloads, yet the round is judged (the harness
    fetches the aggregate while the local platform still runs)."""
    proc, run_dir = _run(
        tmp_path, "platform.faults.notifications.drop_rate=1.0", "rounds=1",
        "timeouts.notification_s=2",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr  # leaves never heard of it
    assert run_dir is not None
    results = _results(run_dir)
    (row,) = results["rounds"]
    assert row["passed"] is True, row.get("reason")
    assert not [e for e in _events(run_dir) if e["kind"] == "download"]
    assert (run_dir / "aggregates" / f"{row['aggregation_id']}.npz").is_file()
    assert not next(c for c in results["checks"] if c["name"].startswith("leaves:"))["passed"]


def test_strategy_mismatch_is_caught(management: Any, tmp_path: Path) -> None:
    """The platform aggregates with median while the harness expects FedAvg."""
    proc, run_dir = _run(
        tmp_path, "platform.strategy=median", "validation.strategy=fedavg", "rounds=1"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert run_dir is not None
    assert _results(run_dir)["rounds"][0]["passed"] is False


def test_one_seed_gives_identical_uploads(management: Any, tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        proc, run_dir = _run(tmp_path / name, "rounds=1")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert run_dir is not None
        digests.append(
            sorted((e["leaf"], e["digest"]) for e in _events(run_dir) if e["kind"] == "upload")
        )
    assert len(digests[0]) == 8
    assert digests[0] == digests[1]


def test_bad_scenario_exits_2_with_a_one_line_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nleaves: {count: 0}\nrounds: 1\n")
    proc, run_dir = _run(tmp_path, scenario=bad)
    assert proc.returncode == 2
    assert run_dir is None
    assert "leaves.count" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unusable_report_dir_exits_2_with_a_one_line_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc, run_dir = _run(tmp_path, f"report.dir={blocker / 'reports'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert run_dir is None
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bk-sim: report.dir: cannot create the run folder ")
    assert line.endswith(": Not a directory")


def test_a_remote_platform_that_is_down_exits_2_before_any_leaf_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    creds = [
        {"id": f"leaf-{i}", "name": f"l{i}", "session_token": "tok-secret-a7c1",
         "owner_id": "o", "tree_id": "t", "branch_id": "b"}
        for i in range(8)
    ]  # fmt: skip
    (tmp_path / "creds.json").write_text(json.dumps(creds))
    started = time.monotonic()
    proc, run_dir = _run(
        tmp_path,
        "platform.mode=remote",
        f"platform.host=http://127.0.0.1:{port}",
        f"platform.credentials_file={tmp_path / 'creds.json'}",
        "broker.provider=none",
        "transport=websocket",
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 60
    assert "Traceback" not in proc.stderr and "tok-secret-a7c1" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bk-sim: platform.host http://127.0.0.1:{port}: did not accept leaf")
    assert run_dir is None  # no results: the run was never made


def test_ctrl_c_stops_everything_and_still_writes_results(management: Any, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    args = [sys.executable, "-m", "bk_sim.cli", "run", str(SMOKE), "--set", f"report.dir={reports}"]
    args += ["--set", "rounds=50", "--set", "leaves.stragglers.fraction=1.0"]
    args += ["--set", "leaves.stragglers.delay_s=1.0"]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        events = None
        while time.monotonic() < deadline:
            found = list(reports.glob("*/events.jsonl")) if reports.exists() else []
            if found and '"kind":"download"' in found[0].read_text():
                events = found[0]
                break
            time.sleep(0.3)
        assert events is not None, "the run never got as far as a download"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, out + err
    assert "Traceback" not in err
    results = json.loads((events.parent / "results.json").read_text())
    assert results["run"]["interrupted"] is True
    assert results["rounds"] and results["rounds"][0]["passed"] is True
    # Nothing is left running: no leaf worker and no platform of this run.
    leftovers = subprocess.run(
        ["pgrep", "-f", str(events.parent)], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == []
