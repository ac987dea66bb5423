"""Our leaf client (bk_sim.client.Client) through full rounds on the reference platform,
over AMQP and over WebSocket, including a lost upload answer that the client retries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bk_sim.client import Client, RetryConfig
from bk_sim.platform import PlatformHandle
from bk_sim.weights import read_layers, save_weights
from tests.integration._platform_support import assert_layers, make_branch, model, reference

pytestmark = pytest.mark.rabbitmq

RETRY = RetryConfig(max_retries=3, backoff_factor=0.01, total_timeout=10)


def _client(url: str, leaf: dict[str, str], out: Path, *, websocket: bool) -> Client:
    return Client(
        leaf,
        host=url,
        ssl=False,
        rbmq_host="127.0.0.1",
        rbmq_port=5672,
        rbmq_ssl=False,
        rbmq_reconnect_backoff_factor=1.1,
        retry_config=RETRY,
        use_websocket=websocket,
        output_dir=out,
    )


@pytest.mark.parametrize("websocket", [False, True], ids=["amqp", "websocket"])
def test_clients_play_two_rounds(platform: PlatformHandle, tmp_path: Path, websocket: bool) -> None:
    rng = np.random.default_rng(15)
    n = 3
    with make_branch(platform, n) as b:
        clients = [
            _client(b.url, leaf, tmp_path / f"out{i}", websocket=websocket)
            for i, leaf in enumerate(b.leaves)
        ]
        try:
            assert all(c.run_status == "start" and c.run_number == 1 for c in clients)
            for rnd in (1, 2):
                weights = [float(i + rnd) for i in range(n)]
                models = [model(rng) for _ in range(n)]
                for i, c in enumerate(clients):
                    path = save_weights(tmp_path / f"w{i}-{rnd}", weights[i], models[i])
                    c.file_upload(path)
                ids = {c.queue.get(timeout=10) for c in clients}
                assert len(ids) == 1
                agg_id = ids.pop()
                assert b.wait(rnd)["aggregation_id"] == agg_id
                got = read_layers(clients[0].file_download(agg_id))
                assert_layers(got, reference("fedavg", weights, models))
                assert clients[1].send_performance_metrics(agg_id, {"acc": 0.5})
            assert len(b.admin.metrics(b.branch_id)) == 2
            assert clients[0].get_branch_config()["branch"]["id"] == b.branch_id
        finally:
            for c in clients:
                c.close()


def test_client_retry_after_lost_answer_is_counted_once(
    platform: PlatformHandle, tmp_path: Path
) -> None:
    rng = np.random.default_rng(16)
    with make_branch(platform, 2) as b:
        clients = [
            _client(b.url, leaf, tmp_path / f"o{i}", websocket=False)
            for i, leaf in enumerate(b.leaves)
        ]
        try:
            b.admin.set_faults(
                b.branch_id,
                {
                    "http": [
                        {"endpoint": "upload", "drop_response": True, "count": 1},
                        {"endpoint": "download", "status": 503, "count": 1},
                    ]
                },
            )
            models = [model(rng), model(rng)]
            for i, c in enumerate(clients):
                c.file_upload(save_weights(tmp_path / f"w{i}", 1.0 + i, models[i]))
            agg_id = clients[0].queue.get(timeout=10)
            rec = b.wait(1)
            assert len(rec["uploads"]) == 2
            got = read_layers(clients[0].file_download(agg_id))  # retried past the 503
            assert_layers(got, reference("fedavg", [1.0, 2.0], models))
            stats = b.admin.stats()
            assert stats["upload"]["dropped"] >= 1
        finally:
            for c in clients:
                c.close()
