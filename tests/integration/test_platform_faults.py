"""Each fault the admin API can inject, and that rounds still aggregate afterwards."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import pytest
import requests

from bk_sim.broker import ManagementAPI
from bk_sim.errors import PlatformError
from bk_sim.platform import PlatformHandle
from bk_sim.weights import encode_weights
from tests.integration._platform_support import (
    assert_layers,
    leaf_headers,
    make_branch,
    model,
    post_upload,
    read_queue,
    reference,
)

pytestmark = pytest.mark.rabbitmq


def _run(b, i: int = 0) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.get(
        f"{b.url}/api/v1/run/{b.branch_id}", headers=leaf_headers(b.leaves[i]), timeout=5
    )


def test_status_fault_with_count_and_retry_after_then_round_is_correct(
    platform: PlatformHandle,
) -> None:
    rng = np.random.default_rng(4)
    with make_branch(platform, 2) as b:
        b.admin.set_faults(
            b.branch_id,
            {
                "http": [
                    {"endpoint": "upload", "status": 503, "count": 2, "retry_after": 1.5},
                ]
            },
        )
        m0, m1 = model(rng), model(rng)
        for _ in range(2):
            resp = b.upload(0, 1.0, m0)
            assert resp.status_code == 503
            assert resp.headers["Retry-After"] == "2"
            assert resp.json() == {"error": "injected fault: HTTP 503"}
        assert _run(b).status_code == 200  # other endpoints untouched
        b.upload_ok(0, 1.0, m0)
        b.upload_ok(1, 3.0, m1)
        rec = b.wait(1)
        assert len(rec["uploads"]) == 2
        assert_layers(
            b.download(0, rec["aggregation_id"]), reference("fedavg", [1.0, 3.0], [m0, m1])
        )
        assert b.admin.faults(b.branch_id)["http"][0]["count"] == 0


def test_rate_faults_are_deterministic_for_a_seed(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        patterns = []
        for _ in range(2):
            b.admin.set_faults(
                b.branch_id, {"seed": 42, "http": [{"endpoint": "*", "status": 500, "rate": 0.5}]}
            )
            patterns.append([_run(b).status_code for _ in range(16)])
        assert patterns[0] == patterns[1]
        assert set(patterns[0]) == {200, 500}
        b.admin.set_faults(
            b.branch_id, {"seed": 7, "http": [{"endpoint": "*", "status": 500, "rate": 0.5}]}
        )
        assert [_run(b).status_code for _ in range(16)] != patterns[0]


def test_latency_and_reset(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        b.admin.set_faults(
            b.branch_id,
            {
                "http": [
                    {"endpoint": "run", "status": None, "latency_s": 0.3, "count": 1},
                    {"endpoint": "run", "reset": True, "count": 1},
                ]
            },
        )
        t0 = time.monotonic()
        assert _run(b).status_code == 200
        assert time.monotonic() - t0 >= 0.3
        with pytest.raises(requests.ConnectionError):
            _run(b)
        assert _run(b).status_code == 200
        stats = b.admin.stats()["run"]
        assert stats["dropped"] >= 1


def test_dropped_response_upload_took_effect_and_retry_counts_once(
    platform: PlatformHandle,
) -> None:
    rng = np.random.default_rng(5)
    with make_branch(platform, 2) as b:
        b.admin.set_faults(
            b.branch_id, {"http": [{"endpoint": "upload", "drop_response": True, "count": 1}]}
        )
        m0, m1 = model(rng), model(rng)
        with pytest.raises(requests.ConnectionError):
            b.upload(0, 2.0, m0)
        rec = b.admin.round(b.branch_id, 1)
        assert len(rec["uploads"]) == 1  # the work was done
        assert b.upload_ok(0, 2.0, m0) == rec["uploads"][0]["file_id"]
        b.upload_ok(1, 1.0, m1)
        rec = b.wait(1)
        assert len(rec["uploads"]) == 2
        assert_layers(
            b.download(0, rec["aggregation_id"]), reference("fedavg", [2.0, 1.0], [m0, m1])
        )


def test_dedupe_off_counts_a_retry_twice(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(6)
    with make_branch(platform, 2) as b:
        b.admin.set_faults(b.branch_id, {"dedupe": False})
        m0, m1 = model(rng), model(rng)
        first = b.upload_ok(0, 2.0, m0)
        second = b.upload_ok(0, 2.0, m0)
        assert first != second
        b.upload_ok(1, 1.0, m1)
        rec = b.wait(1)
        assert [u["leaf_id"] for u in rec["uploads"]].count(b.leaves[0]["id"]) == 2
        assert_layers(
            b.download(0, rec["aggregation_id"]), reference("fedavg", [2.0, 2.0, 1.0], [m0, m0, m1])
        )


@pytest.mark.parametrize("bug", ["unweighted", "drop_leaf", "double_count"])
def test_aggregation_bugs_are_wrong_but_the_record_is_honest(
    platform: PlatformHandle, bug: str
) -> None:
    rng = np.random.default_rng(8)
    with make_branch(platform, 3) as b:
        b.admin.set_faults(b.branch_id, {"aggregation": bug})
        weights = [1.0, 5.0, 2.0]
        models = [model(rng) for _ in range(3)]
        for i in range(3):
            b.upload_ok(i, weights[i], models[i])
        rec = b.wait(1)
        assert [u["weighting"] for u in rec["uploads"]] == weights
        got = b.download(0, rec["aggregation_id"])
        heavy = b.leaves[1]["id"]
        if bug == "unweighted":
            expected = reference("mean", weights, models)
            assert rec["fault"] == {"aggregation": bug, "victim_leaf_id": None}
        elif bug == "drop_leaf":
            expected = reference("fedavg", [1.0, 2.0], [models[0], models[2]])
            assert rec["fault"] == {"aggregation": bug, "victim_leaf_id": heavy}
        else:
            expected = reference(
                "fedavg", [1.0, 5.0, 5.0, 2.0], [models[0], models[1], models[1], models[2]]
            )
            assert rec["fault"] == {"aggregation": bug, "victim_leaf_id": heavy}
        assert_layers(got, expected)
        honest = reference("fedavg", weights, models)
        assert not np.allclose(got[0], honest[0])


def test_stale_serves_the_previous_aggregate(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(9)
    with make_branch(platform, 1) as b:
        b.upload_ok(0, 1.0, model(rng))
        first = b.wait(1)["aggregation_id"]
        b.admin.set_faults(b.branch_id, {"aggregation": "stale"})
        b.upload_ok(0, 1.0, model(rng))
        rec = b.wait(2)
        assert rec["aggregation_id"] == first
        assert rec["fault"]["aggregation"] == "stale"


def test_notification_delay_and_drop(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(10)
    with make_branch(platform, 4) as b:
        for leaf in b.leaves:
            read_queue(leaf, 1)  # the run_status start notice
        b.admin.set_faults(b.branch_id, {"notifications": {"delay_s": 1.5}})
        for i in range(4):
            b.upload_ok(i, 1.0, model(rng))
        rec = b.wait(1)
        # Wait for the event (the notice arriving), then check it came no earlier than
        # the delay after the round closed: no fixed sleep, no "not yet" race.
        got = read_queue(b.leaves[0], 1, timeout=10)
        arrived = datetime.now(timezone.utc)
        assert len(got) == 1
        assert (arrived - datetime.fromisoformat(rec["closed_at"])).total_seconds() >= 1.5
        assert all(len(read_queue(leaf, 1)) == 1 for leaf in b.leaves[1:])
        assert read_queue(b.leaves[1], 0, timeout=0) == []
        b.admin.set_faults(b.branch_id, {"seed": 3, "notifications": {"drop_rate": 0.5}})
        for i in range(4):
            b.upload_ok(i, 1.0, model(rng))
        rec = b.wait(2)
        got = [read_queue(leaf, 1, timeout=0.5) for leaf in b.leaves]
        assert 0 < sum(len(g) for g in got) < 4
        for g in got:
            assert g in (
                [],
                [
                    {
                        "message_type": "aggregation_status",
                        "body": {"aggregation_id": rec["aggregation_id"]},
                    }
                ],
            )


def test_bad_fault_specs_and_stats(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        for spec, needle in (
            ({"http": [{"endpoint": "nowhere"}]}, "endpoint must be one of"),
            ({"http": [{"rate": 2}]}, "rate must be within"),
            ({"aggregation": "wrong"}, "aggregation must be null or one of"),
            ({"dedupe": "no"}, "dedupe must be true or false"),
            ({"surprise": 1}, "unknown fault keys"),
        ):
            with pytest.raises(PlatformError, match=needle):
                b.admin.set_faults(b.branch_id, spec)
        b.admin.reset_stats()
        b.admin.set_faults(b.branch_id, {"http": [{"endpoint": "run", "status": 429, "count": 1}]})
        assert _run(b).status_code == 429
        assert _run(b).status_code == 200
        assert post_upload(b.url, b.leaves[0], encode_weights(1.0, [np.ones(2)])).status_code == 201
        stats = b.admin.stats()
        assert stats["run"] == {"429": 1, "200": 1}
        assert stats["upload"] == {"201": 1}


def test_publisher_reconnects_after_the_broker_drops_it(
    platform: PlatformHandle, management: ManagementAPI
) -> None:
    """The broker force-closes the platform's publishing connection; the next notice still
    arrives (the publisher reconnects and republishes under confirms)."""
    with make_branch(platform, 1) as b:
        read_queue(b.leaves[0], 1)
        name = f"bk-sim-platform-{platform.pid}"
        deadline = time.monotonic() + 15  # the connection list lags by the stats interval
        ours: list[str] = []
        while not ours and time.monotonic() < deadline:
            ours = [
                c["name"]
                for c in management.connections()
                if c.get("client_properties", {}).get("connection_name") == name
                and c.get("vhost") == b.tree_id
            ]
            if not ours:
                time.sleep(0.5)
        assert ours, "the platform's connection to the tree's vhost never showed up"
        for conn in ours:
            management.close_connection(conn)
        b.admin.set_run_status(b.branch_id, "pause")
        assert read_queue(b.leaves[0], 1)[0]["body"] == {"run_status": "pause"}
