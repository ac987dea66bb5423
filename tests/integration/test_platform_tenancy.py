"""Rounds never stall and tenants never wait for each other (issue 16, parts 5 and 6)."""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bk_sim.platform import PlatformHandle
from bk_sim.weights import encode_weights
from tests.integration._platform_attacks import wait_for_log
from tests.integration._platform_support import (
    assert_layers,
    leaf_headers,
    make_branch,
    post_upload,
    read_queue,
    reference,
)

pytestmark = pytest.mark.rabbitmq

RIGHT = [np.ones((3, 4), np.float32), np.ones(5, np.float32)]


@pytest.mark.parametrize(
    "wrong",
    [
        [np.ones((4, 3), np.float32), np.ones(5, np.float32)],  # shape
        [np.ones((3, 4), np.float64), np.ones(5, np.float32)],  # dtype
        [np.ones((3, 4), np.float32)],  # layer count
    ],
)
def test_a_leaf_replaces_the_upload_that_fixed_the_layout(
    platform: PlatformHandle, wrong: list[np.ndarray]
) -> None:
    with make_branch(platform, 2) as b:
        b.upload_ok(0, 1.0, wrong)
        resp = b.upload(1, 1.0, RIGHT)
        assert resp.status_code == 400, resp.text  # the round's layout is the wrong one
        m0 = [x * 2 for x in RIGHT]
        b.upload_ok(0, 3.0, m0)  # ...until its leaf replaces it
        m1 = [x * 4 for x in RIGHT]
        b.upload_ok(1, 1.0, m1)
        rec = b.wait(1)
        assert rec["status"] == "aggregated" and len(rec["uploads"]) == 2
        assert_layers(b.download(0, rec["aggregation_id"]), reference("fedavg", [3, 1], [m0, m1]))


def test_a_layout_another_leaf_holds_is_kept(platform: PlatformHandle) -> None:
    with make_branch(platform, 3) as b:
        b.upload_ok(0, 1.0, RIGHT)
        b.upload_ok(1, 1.0, RIGHT)
        resp = b.upload(0, 1.0, [np.ones(7, np.float32)])
        assert resp.status_code == 400 and "layers" in resp.json()["error"]


def test_stop_then_start_abandons_the_open_round_with_its_reason(
    platform: PlatformHandle,
) -> None:
    files = platform.data_dir / "files"
    with make_branch(platform, 2) as b:
        stale = b.upload_ok(0, 1.0, [np.ones((2, 2), np.float32)])
        b.admin.set_run_status(b.branch_id, "stop")
        b.admin.set_run_status(b.branch_id, "start")
        rec = b.wait(1)
        assert rec["status"] == "abandoned"
        assert rec["close_reason"] == "abandoned: run 2 started" and rec["aggregation_id"] is None
        assert not (files / f"{stale}.npz").exists()  # no round needs it any more
        b.upload_ok(0, 1.0, RIGHT)  # another layout: a fresh round
        b.upload_ok(1, 1.0, RIGHT)
        rec2 = b.wait(2)
        assert rec2["status"] == "aggregated" and rec2["run_number"] == 2


def test_pause_then_start_keeps_the_open_round(platform: PlatformHandle) -> None:
    with make_branch(platform, 2) as b:
        b.upload_ok(0, 1.0, RIGHT)
        b.admin.set_run_status(b.branch_id, "pause")
        b.admin.set_run_status(b.branch_id, "start")
        b.upload_ok(1, 1.0, RIGHT)
        rec = b.wait(1)
        assert rec["status"] == "aggregated" and len(rec["uploads"]) == 2


def test_only_a_repeat_of_the_completing_upload_is_a_retry_across_rounds(
    platform: PlatformHandle,
) -> None:
    """Leaf 0 uploads U0, leaf 1's U1 closes round 1, leaf 1's U1b opens round 2, leaf 0
    re-sends U0: that is leaf 0's round-2 upload, not a retry into round 1."""
    rng = np.random.default_rng(5)
    with make_branch(platform, 2) as b:
        u0 = encode_weights(1.0, [rng.random(4)])
        u1 = encode_weights(1.0, [rng.random(4)])
        first0 = post_upload(b.url, b.leaves[0], u0).json()["data"]["file_id"]
        closing = post_upload(b.url, b.leaves[1], u1).json()["data"]["file_id"]
        b.wait(1)
        # the completing upload's resend (its answer was lost) is that same upload
        again = post_upload(b.url, b.leaves[1], u1)
        assert again.status_code == 201 and again.json()["data"]["file_id"] == closing
        assert len(b.admin.rounds(b.branch_id)) == 1
        # leaf 0's upload did not complete the round: its resend goes into round 2
        b.upload_ok(1, 1.0, [rng.random(4)])
        resent = post_upload(b.url, b.leaves[0], u0)
        assert resent.status_code == 201 and resent.json()["data"]["file_id"] != first0
        rec = b.wait(2)
        assert rec["status"] == "aggregated"
        assert sorted(u["leaf_id"] for u in rec["uploads"]) == sorted(
            leaf["id"] for leaf in b.leaves
        )
        # once leaf 1 uploaded to round 3, its round-2 upload's resend is new again
        b.upload_ok(1, 1.0, [rng.random(4)])
        rec2_closing = b.admin.round(b.branch_id, 2)["closed_by"]
        assert rec2_closing == resent.json()["data"]["file_id"]


@pytest.mark.parametrize("next_round_open", [False, True])
def test_a_resend_whose_answer_was_lost_stays_a_retry_after_the_round_closed(
    platform: PlatformHandle, next_round_open: bool
) -> None:
    """The other side of the rule: leaf 0's answer was dropped (the platform knows it
    never wrote it), the round closed meanwhile; leaf 0's retry is that upload, not its
    upload for the next round (which would close that round with stale weights)."""
    rng = np.random.default_rng(6)
    with make_branch(platform, 2) as b:
        b.admin.set_faults(
            b.branch_id, {"http": [{"endpoint": "upload", "drop_response": True, "count": 1}]}
        )
        u0 = encode_weights(1.0, [rng.random(4)])
        with pytest.raises(requests.ConnectionError):
            post_upload(b.url, b.leaves[0], u0)
        b.upload_ok(1, 1.0, [rng.random(4)])
        first = b.wait(1)
        counted = next(u for u in first["uploads"] if u["leaf_id"] == b.leaves[0]["id"])
        if next_round_open:
            b.upload_ok(1, 1.0, [rng.random(4)])
        retry = post_upload(b.url, b.leaves[0], u0)
        assert retry.status_code == 201 and retry.json()["data"]["file_id"] == counted["file_id"]
        rounds = b.admin.rounds(b.branch_id)
        assert len(rounds) == (2 if next_round_open else 1)
        if next_round_open:
            assert [u["leaf_id"] for u in rounds[1]["uploads"]] == [b.leaves[1]["id"]]


def test_deleting_a_tree_never_delays_another_trees_notifications(
    platform: PlatformHandle,
) -> None:
    """A publish for a deleted tree used to be retried for 30 s in front of every other
    tree's (a run-status change on an unrelated tree took 25.7 s)."""
    with make_branch(platform, 1) as other:
        read_queue(other.leaves[0], 1)  # its start notice
        with make_branch(platform, 1) as doomed:
            doomed.admin.set_faults(doomed.branch_id, {"notifications": {"delay_s": 0.5}})
            doomed.admin.set_run_status(doomed.branch_id, "pause")  # published after 0.5 s
        # the tree is gone before its delayed notice is published; once that publish is
        # tried (and logged), another tree's notice must not wait behind it
        wait_for_log(platform.log_path, f"vhost {doomed.tree_id}", timeout=15)
        start = time.monotonic()
        other.admin.set_run_status(other.branch_id, "pause")  # returns once confirmed
        took = time.monotonic() - start
        assert took < 5, f"another tree's notification took {took:.1f}s"
        assert read_queue(other.leaves[0], 1)[0]["body"] == {"run_status": "pause"}


def test_deleting_a_tree_closes_its_leaves_websockets_at_once(platform: PlatformHandle) -> None:
    admin = platform.admin
    doomed_tree = admin.create_tree(f"doomed-{time.monotonic_ns()}")
    doomed_branch = admin.create_branch(doomed_tree, "b")["branch_id"]
    doomed_leaf = admin.create_leaves(doomed_branch, 1)[0]
    with make_branch(platform, 2) as keep, contextlib.ExitStack() as stack:
        sockets = []
        for leaf in (doomed_leaf, keep.leaves[0]):
            t = requests.post(
                f"{keep.url}/api/v1/ws/ticket", headers=leaf_headers(leaf), timeout=5
            ).json()["data"]
            url = (
                f"{keep.url.replace('http://', 'ws://')}/api/v1/ws?ticket={t['ticket_id']}"
                f"&request_id={t['request_id']}"
            )
            sockets.append(stack.enter_context(connect(url, open_timeout=5)))
        gone, kept = sockets
        admin.delete_tree(doomed_tree)
        with pytest.raises(ConnectionClosed):
            gone.recv(timeout=5)
        keep.admin.set_run_status(keep.branch_id, "pause")
        assert json.loads(kept.recv(timeout=5))["body"] == {"run_status": "pause"}
