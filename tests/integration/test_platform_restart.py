"""A platform killed mid-round loses nothing: uploads before and after the restart make one
correct round, a timeout armed before the restart still fires, signed URLs stay valid."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import requests

from bk_sim.broker import ManagementAPI
from bk_sim.platform import start_platform
from tests.integration._platform_support import (
    assert_layers,
    make_branch,
    model,
    read_queue,
    reference,
)

pytestmark = pytest.mark.rabbitmq


def test_kill_and_restart_mid_round_loses_nothing(
    management: ManagementAPI, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    handle = start_platform(tmp_path / "data")
    try:
        url = handle.url
        with make_branch(handle, 3) as b:
            for leaf in b.leaves:
                read_queue(leaf, 1)
            models = [model(rng) for _ in range(3)]
            weights = [1.0, 2.0, 4.0]
            ids = [b.upload_ok(i, weights[i], models[i]) for i in range(2)]
            handle.restart(kill=True)  # SIGKILL: no graceful shutdown
            assert handle.url == url
            b.admin = handle.admin
            # the identical retry of a pre-restart upload is still recognised
            assert b.upload_ok(1, weights[1], models[1]) == ids[1]
            ids.append(b.upload_ok(2, weights[2], models[2]))
            rec = b.wait(1)
            assert [u["file_id"] for u in rec["uploads"]] == ids
            assert_layers(
                b.download(0, rec["aggregation_id"]), reference("fedavg", weights, models)
            )
            assert read_queue(b.leaves[2], 1)[0]["body"] == {
                "aggregation_id": rec["aggregation_id"]
            }
            assert len(b.admin.rounds(b.branch_id)) == 1
    finally:
        handle.stop()


def test_round_timeout_is_rearmed_after_restart(management: ManagementAPI, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    handle = start_platform(tmp_path / "data")
    try:
        with make_branch(handle, 3, quorum=1, round_timeout_s=3.0) as b:
            m0 = model(rng)
            b.upload_ok(0, 1.0, m0)
            handle.restart()  # graceful: SIGTERM with the round open
            restarted = datetime.now(timezone.utc)
            b.admin = handle.admin
            rec = b.wait(1, timeout=15)
            assert rec["close_reason"] == "timeout_quorum"
            opened, closed = (datetime.fromisoformat(rec[k]) for k in ("opened_at", "closed_at"))
            # closed by the restarted platform's timer, on time (not restarted from zero)
            assert closed >= restarted, "the restart took longer than the round timeout"
            assert 3.0 <= (closed - opened).total_seconds() < 5.0
            link = requests.get(
                f"{b.url}/api/v1/file/download/{rec['aggregation_id']}",
                headers={
                    "Authorization": f"Bearer {b.leaves[0]['id']}:{b.leaves[0]['session_token']}"
                },
                timeout=5,
            ).json()["data"]["download_url"]
            handle.restart()
            b.admin = handle.admin
            blob = requests.get(link, timeout=5)  # signing key survives the restart
            assert blob.status_code == 200
            assert_layers(b.download(1, rec["aggregation_id"]), reference("fedavg", [1.0], [m0]))
    finally:
        handle.stop()


def test_stop_is_prompt_and_restart_keeps_port(management: ManagementAPI, tmp_path: Path) -> None:
    handle = start_platform(tmp_path / "data")
    url = handle.url
    t0 = time.monotonic()
    handle.stop()
    assert time.monotonic() - t0 < 5
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=2)
    handle.restart()
    try:
        assert handle.url == url
        assert handle.admin.health()["broker"] == "ok"
    finally:
        handle.stop()


def test_platform_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from bk_sim.platform import start_platform\n"
        f"h = start_platform({str(tmp_path / 'data')!r}, no_amqp=True)\n"
        "print(h.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        parent.kill()  # no cleanup code runs in the parent
        parent.wait(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            pytest.fail("the platform outlived its parent")
    finally:
        if parent.stdout is not None:
            parent.stdout.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
