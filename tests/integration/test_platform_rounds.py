"""Full rounds on the reference platform over raw HTTP, notifications read from the real
RabbitMQ as each leaf: each strategy against a numpy reference, round closing rules,
dedupe and replacement."""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from bk_sim.broker import ManagementAPI
from bk_sim.platform import PlatformHandle
from tests.integration._platform_support import (
    assert_layers,
    leaf_headers,
    make_branch,
    model,
    read_queue,
    reference,
)

pytestmark = pytest.mark.rabbitmq


@pytest.mark.parametrize("strategy", ["fedavg", "mean", "median", "trimmed_mean"])
def test_round_aggregates_like_numpy_and_notifies_every_leaf(
    platform: PlatformHandle, strategy: str
) -> None:
    rng = np.random.default_rng(7)
    n = 5
    with make_branch(platform, n, strategy=strategy, trim_fraction=0.2) as b:
        for leaf in b.leaves:  # the run_status "start" notice is queued for every leaf
            assert read_queue(leaf, 1) == [
                {"message_type": "run_status", "body": {"run_status": "start"}}
            ]
        weights = [1.0, 2.0, 3.5, 0.5, 10.0]
        models = [model(rng) for _ in range(n)]
        file_ids = [b.upload_ok(i, weights[i], models[i]) for i in range(n)]
        record = b.wait(1)
        assert record["status"] == "aggregated"
        assert record["close_reason"] == "all_uploaded"
        assert record["strategy"] == strategy
        assert record["run_number"] == 1
        assert [u["file_id"] for u in record["uploads"]] == file_ids
        assert [u["weighting"] for u in record["uploads"]] == weights
        assert record["fault"] == {"aggregation": None, "victim_leaf_id": None}
        got = b.download(0, record["aggregation_id"])
        assert_layers(got, reference(strategy, weights, models, trim_fraction=0.2))
        for leaf in b.leaves:
            assert read_queue(leaf, 1) == [
                {
                    "message_type": "aggregation_status",
                    "body": {"aggregation_id": record["aggregation_id"]},
                }
            ]


def test_second_round_opens_on_next_upload_and_int_layers_keep_dtype(
    platform: PlatformHandle,
) -> None:
    with make_branch(platform, 2) as b:
        for rnd in (1, 2):
            a = [np.full(4, 10 * rnd, np.int32)]
            c = [np.full(4, 20 * rnd, np.int32)]
            b.upload_ok(0, 1.0, a)
            b.upload_ok(1, 3.0, c)
            rec = b.wait(rnd)
            assert rec["round"] == rnd
            got = b.download(1, rec["aggregation_id"])
            assert got[0].dtype == np.int32
            assert got[0].tolist() == [round((10 * rnd + 60 * rnd) / 4)] * 4
        assert [r["round"] for r in b.admin.rounds(b.branch_id)] == [1, 2]


def test_identical_retry_is_counted_once_and_different_upload_replaces(
    platform: PlatformHandle,
) -> None:
    rng = np.random.default_rng(1)
    with make_branch(platform, 2) as b:
        first, second = model(rng), model(rng)
        fid = b.upload_ok(0, 1.0, first)
        assert b.upload_ok(0, 1.0, first) == fid  # same digest: same file, counted once
        assert len(b.admin.round(b.branch_id, 1)["uploads"]) == 1
        fid2 = b.upload_ok(0, 4.0, second)  # different: replaces
        assert fid2 != fid
        rec = b.admin.round(b.branch_id, 1)
        assert [(u["file_id"], u["weighting"]) for u in rec["uploads"]] == [(fid2, 4.0)]
        other = model(rng)
        b.upload_ok(1, 1.0, other)
        rec = b.wait(1)
        assert_layers(
            b.download(1, rec["aggregation_id"]), reference("fedavg", [4.0, 1.0], [second, other])
        )
        # a retry arriving after its round closed is still the same upload, not round 2
        assert b.upload_ok(1, 1.0, other) == rec["uploads"][1]["file_id"]
        assert len(b.admin.rounds(b.branch_id)) == 1


def test_timeout_closes_with_quorum_and_waits_below_it(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(2)
    with make_branch(platform, 4, quorum=2, round_timeout_s=0.5) as b:
        m0 = model(rng)
        b.upload_ok(0, 2.0, m0)
        time.sleep(1.0)  # timed out below quorum: still open
        rec = b.admin.round(b.branch_id, 1)
        assert rec["status"] == "open" and rec["closed_at"] is None
        m1 = model(rng)
        b.upload_ok(1, 1.0, m1)  # quorum reached after the timeout: closes now
        rec = b.wait(1)
        assert rec["close_reason"] == "timeout_quorum"
        assert_layers(
            b.download(2, rec["aggregation_id"]), reference("fedavg", [2.0, 1.0], [m0, m1])
        )
        # round 2: quorum met before the timeout, the timer closes it
        b.upload_ok(2, 1.0, model(rng))
        b.upload_ok(3, 1.0, model(rng))
        t0 = time.monotonic()
        rec2 = b.wait(2)
        assert rec2["close_reason"] == "timeout_quorum"
        assert len(rec2["uploads"]) == 2
        assert time.monotonic() - t0 < 4.0  # the 0.5 s timer, not a wait for all leaves


def test_upload_refused_when_run_not_started_and_run_control(platform: PlatformHandle) -> None:
    with make_branch(platform, 1, start=False) as b:
        leaf = b.leaves[0]
        resp = b.upload(0, 1.0, [np.ones(2)])
        assert resp.status_code == 409
        assert "run is not started" in resp.json()["error"]
        run = requests.get(
            f"{b.url}/api/v1/run/{b.branch_id}", headers=leaf_headers(leaf), timeout=5
        )
        assert run.json() == {"data": {"run_status": "stop", "run_number": 0}}
        assert b.admin.set_run_status(b.branch_id, "start") == {
            "run_status": "start",
            "run_number": 1,
        }
        assert b.admin.set_run_status(b.branch_id, "pause")["run_number"] == 1
        assert b.upload(0, 1.0, [np.ones(2)]).status_code == 409
        assert b.admin.set_run_status(b.branch_id, "start")["run_number"] == 2
        msgs = read_queue(leaf, 3)
        assert [m["body"]["run_status"] for m in msgs] == ["start", "pause", "start"]
        assert b.upload(0, 1.0, [np.ones(2)]).status_code == 201
        assert b.wait(1)["run_number"] == 2


def test_branch_config_metrics_and_admin_config(platform: PlatformHandle) -> None:
    with make_branch(platform, 1, model_config={"lr": 0.1}) as b:
        leaf = b.leaves[0]
        cfg = requests.get(
            f"{b.url}/api/v1/config/branch/{b.branch_id}", headers=leaf_headers(leaf), timeout=5
        )
        assert cfg.status_code == 200
        data = cfg.json()["data"]
        assert data["model_config"] == {"lr": 0.1}
        assert data["branch"]["strategy"] == "fedavg"
        assert {"service", "created_at", "updated_at"} <= set(data)
        updated = b.admin.set_config(b.branch_id, strategy="median", quorum=1)
        assert updated["strategy"] == "median" and updated["quorum"] == 1
        assert updated["model_config"] == {"lr": 0.1}  # partial PUT keeps the rest
        with pytest.raises(Exception, match="strategy must be one of"):
            b.admin.set_config(b.branch_id, strategy="best")
        body = {
            "mode": "test",
            "aggregation_id": "x",
            "leaf_id": leaf["id"],
            "branch_id": b.branch_id,
            "tree_id": b.tree_id,
            "data": '{"acc": 0.9}',
        }
        resp = requests.post(
            f"{b.url}/api/v1/performance/analysis", json=body, headers=leaf_headers(leaf), timeout=5
        )
        assert resp.status_code == 201
        stored = b.admin.metrics(b.branch_id)
        assert [(m["mode"], m["data"], m["leaf_id"]) for m in stored] == [
            ("test", '{"acc": 0.9}', leaf["id"])
        ]
        bad = requests.post(
            f"{b.url}/api/v1/performance/analysis",
            json={**body, "mode": "eval"},
            headers=leaf_headers(leaf),
            timeout=5,
        )
        assert bad.status_code == 400 and "mode must be one of" in bad.json()["error"]


def test_delete_tree_removes_vhost_and_users(
    platform: PlatformHandle, management: ManagementAPI
) -> None:
    with make_branch(platform, 2) as b:
        tree_id, leaf_id = b.tree_id, b.leaves[0]["id"]
        assert management.queue(tree_id, leaf_id)["durable"] is True
    with pytest.raises(Exception, match="404"):
        management.queue(tree_id, leaf_id)
    resp = requests.get(
        f"{platform.url}/api/v1/run/{b.branch_id}", headers=leaf_headers(b.leaves[0]), timeout=5
    )
    assert resp.status_code == 401


def test_secrets_never_reach_the_log(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        leaf = b.leaves[0]
        fid = b.upload_ok(0, 1.0, [np.ones(3)])
        link = requests.get(
            f"{b.url}/api/v1/file/download/{fid}", headers=leaf_headers(leaf), timeout=5
        ).json()["data"]["download_url"]
        assert requests.get(link, timeout=5).status_code == 200
        sig = link.split("sig=")[1]
        ticket = requests.post(
            f"{b.url}/api/v1/ws/ticket", headers=leaf_headers(leaf), timeout=5
        ).json()["data"]["ticket_id"]
        requests.get(f"{b.url}/api/v1/ws?ticket={ticket}&request_id=x", timeout=5)
        requests.get(
            f"{b.url}/api/v1/run/{b.branch_id}",
            timeout=5,
            headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}x"},
        )
        b.wait(1)
    log = platform.log_path.read_text()
    assert "/api/v1/ws" in log and "/files/" in log  # the access log is on
    for secret in (leaf["session_token"], sig, ticket, platform.admin_token):
        assert secret not in log


def test_a_round_whose_upload_vanished_fails_and_the_next_one_works(
    platform: PlatformHandle,
) -> None:
    rng = np.random.default_rng(17)
    with make_branch(platform, 2) as b:
        lost = b.upload_ok(0, 1.0, model(rng))
        (platform.data_dir / "files" / f"{lost}.npz").unlink()  # disk trouble
        b.upload_ok(1, 1.0, model(rng))
        rec = b.wait(1)
        assert rec["status"] == "failed" and rec["aggregation_id"] is None
        assert b.leaves[0]["id"] in rec["error"]
        for leaf in b.leaves:  # no aggregation_status for a failed round
            assert [m["message_type"] for m in read_queue(leaf, 1)] == ["run_status"]
        m0, m1 = model(rng), model(rng)
        b.upload_ok(0, 1.0, m0)
        b.upload_ok(1, 2.0, m1)
        rec = b.wait(2)
        assert rec["status"] == "aggregated"
        assert_layers(
            b.download(0, rec["aggregation_id"]), reference("fedavg", [1.0, 2.0], [m0, m1])
        )


def test_config_change_applies_to_the_open_round(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(18)
    with make_branch(platform, 3) as b:  # no timeout: waits for all three
        m0 = model(rng)
        b.upload_ok(0, 1.0, m0)
        b.admin.set_config(b.branch_id, quorum=1, round_timeout_s=0.3)
        rec = b.wait(1, timeout=5)
        assert rec["close_reason"] == "timeout_quorum" and len(rec["uploads"]) == 1
