"""The WebSocket transport of PROTOCOL.md 4b against the reference platform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from bk_sim.platform import PlatformHandle, start_platform
from tests.conftest import PlatformFactory
from tests.integration._platform_support import leaf_headers, make_branch, model


@pytest.fixture(scope="module")
def platform(platform_factory: PlatformFactory) -> PlatformHandle:
    return platform_factory(no_amqp=True)


def _ticket(url: str, leaf: dict[str, str]) -> dict[str, str]:
    resp = requests.post(f"{url}/api/v1/ws/ticket", headers=leaf_headers(leaf), timeout=5)
    assert resp.status_code == 200
    data: dict[str, str] = resp.json()["data"]
    assert set(data) == {"ticket_id", "request_id", "expires_at"}
    return data


def _ws_url(url: str, t: dict[str, str]) -> str:
    return (
        f"{url.replace('http://', 'ws://')}/api/v1/ws?ticket={t['ticket_id']}"
        f"&request_id={t['request_id']}"
    )


def test_websocket_gets_run_status_and_aggregation_and_ticket_is_single_use(
    platform: PlatformHandle,
) -> None:
    rng = np.random.default_rng(13)
    with make_branch(platform, 2, start=False) as b:
        t = _ticket(b.url, b.leaves[0])
        with connect(_ws_url(b.url, t), open_timeout=5) as ws:
            b.admin.set_run_status(b.branch_id, "start")
            assert json.loads(ws.recv(timeout=5)) == {
                "message_type": "run_status",
                "body": {"run_status": "start"},
            }
            b.upload_ok(0, 1.0, model(rng))
            b.upload_ok(1, 1.0, model(rng))
            rec = b.wait(1)
            assert json.loads(ws.recv(timeout=5)) == {
                "message_type": "aggregation_status",
                "body": {"aggregation_id": rec["aggregation_id"]},
            }
        with pytest.raises(InvalidStatus) as err:
            connect(_ws_url(b.url, t), open_timeout=5)
        assert err.value.response.status_code == 401
        bad = {**_ticket(b.url, b.leaves[0]), "request_id": "other"}
        with pytest.raises(InvalidStatus):
            connect(_ws_url(b.url, bad), open_timeout=5)


def test_messages_wait_for_a_reconnecting_websocket_leaf(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(14)
    with make_branch(platform, 1) as b:
        with connect(_ws_url(b.url, _ticket(b.url, b.leaves[0])), open_timeout=5):
            pass
        b.upload_ok(0, 1.0, model(rng))
        rec = b.wait(1)
        with connect(_ws_url(b.url, _ticket(b.url, b.leaves[0])), open_timeout=5) as ws:
            msg = json.loads(ws.recv(timeout=5))
        assert msg["body"] == {"aggregation_id": rec["aggregation_id"]}


def test_no_amqp_health(platform: PlatformHandle, tmp_path: Path) -> None:
    assert platform.admin.health() == {"status": "ok", "store": "ok", "broker": "disabled"}


def test_stop_with_a_websocket_open_is_prompt_and_public_url_is_used(tmp_path: Path) -> None:
    import time

    handle = start_platform(
        tmp_path / "data", no_amqp=True, public_url="http://files.example.test:9"
    )
    try:
        with make_branch(handle, 1) as b:
            fid = b.upload_ok(0, 1.0, [np.ones(2)])
            resp = requests.get(
                f"{b.url}/api/v1/file/download/{fid}", headers=leaf_headers(b.leaves[0]), timeout=5
            )
            assert resp.json()["data"]["download_url"].startswith(
                f"http://files.example.test:9/files/{fid}?expires="
            )
            with connect(_ws_url(b.url, _ticket(b.url, b.leaves[0])), open_timeout=5):
                t0 = time.monotonic()
                handle.stop()
                assert time.monotonic() - t0 < 5
            handle.restart()  # so the branch can be deleted
    finally:
        handle.stop()
