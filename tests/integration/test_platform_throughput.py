"""How fast the reference platform takes a round of uploads and aggregates it.

Prints its figures (run with ``-s``); ``BK_SIM_PERF_LEAVES`` / ``BK_SIM_PERF_MB`` scale it
(defaults 20 leaves x 4 MB keep it to a few seconds).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.platform import start_platform
from bk_sim.weights import encode_weights
from tests.integration._platform_support import make_branch, post_upload

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_round_of_uploads_throughput(management: ManagementAPI, tmp_path: Path) -> None:
    leaves = int(os.environ.get("BK_SIM_PERF_LEAVES", "20"))
    mb = float(os.environ.get("BK_SIM_PERF_MB", "4"))
    rng = np.random.default_rng(0)
    count = int(mb * 2**20 / 4)
    base = rng.standard_normal(count, dtype=np.float32)
    blobs = [encode_weights(1.0 + i, [base + i], compression="fast") for i in range(leaves)]
    with start_platform(tmp_path / "data") as handle, make_branch(handle, leaves) as b:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda i: post_upload(b.url, b.leaves[i], blobs[i], timeout=120).status_code,
                    range(leaves),
                )
            )
        t1 = time.perf_counter()
        record = b.wait(1, timeout=120)
        t2 = time.perf_counter()
        assert record["status"] == "aggregated", record
        [got] = b.download(0, record["aggregation_id"])
    assert codes == [201] * leaves
    assert len(record["uploads"]) == leaves
    # FedAvg of base + i with weighting 1 + i, at a size where uploads are added in batches
    w = np.arange(1, leaves + 1, dtype=np.float64)
    shift = float((w * (w - 1)).sum() / w.sum())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, base.astype(np.float64) + shift, rtol=1e-6, atol=1e-5)
    total = sum(len(x) for x in blobs) / 2**20
    print(
        f"\n{leaves} uploads x {mb:g} MB ({total:.0f} MB sent): uploads {t1 - t0:.2f} s "
        f"({total / (t1 - t0):.0f} MB/s), last upload -> aggregated {t2 - t1:.2f} s"
    )
