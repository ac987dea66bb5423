"""The published ``branchkey`` 3.0.1 client completes a federated-analytics round against
our platform: ``save_analytics`` + ``file_upload`` on three leaves, the aggregation notice
over WebSocket, ``file_download`` of the aggregate; the combined fields and the derived
statistics are checked against the pooled columns.

The client runs unmodified, in its own venv (``bk_sim.published.prepare``, in the suite's
one cache under the pytest cache, so it is built once), as a subprocess. Skipped, saying
why, only when the package registry cannot be reached.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bk_sim.errors import PublishedClientError
from bk_sim.platform import PlatformHandle
from bk_sim.published import prepare
from tests.conftest import PlatformFactory
from tests.integration._fa_support import KIND_KEY
from tests.integration._platform_support import make_branch

VERSION = "3.0.1"
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from branchkey import APIConfig, Client, Credentials, WebSocketConfig

    cfg = json.load(open(sys.argv[1]))
    os.makedirs(cfg["uploads"], exist_ok=True)
    clients = [
        Client(
            Credentials(**leaf),
            # ssl=False: with ssl=True 3.0.1 passes an SSL context to a ws:// URL (plain
            # http platform), which websockets refuses; https deployments keep the default
            APIConfig(host=cfg["url"], ssl=False),
            websocket_config=WebSocketConfig(max_reconnect_attempts=5),
            output_dir=cfg["out"],
        )
        for leaf in cfg["leaves"]
    ]
    report = []
    for client, columns in zip(clients, cfg["columns"]):
        cols = {
            name: np.array([np.nan if v is None else v for v in values], dtype=dtype)
            for name, (dtype, values) in columns.items()
        }
        path = client.save_analytics(cols, file_path=cfg["uploads"] + "/" + client.leaf_id)
        report.append({"leaf_id": client.leaf_id, "file_id": client.file_upload(path)})
    for client, entry in zip(clients, report):
        entry["aggregation_id"] = client.queue.get(timeout=60)
        entry["path"] = client.file_download(entry["aggregation_id"])
        entry["output_dir"] = client.output_dir
        client.close()
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="session")
def branchkey_python(published_clients_dir: Path) -> Path:
    """Python of the published client's env, from ``bk_sim.published.prepare`` in the
    suite's one cache (``published_clients_dir``): built once, shared with every other
    test of the published clients."""
    try:
        env = prepare(f"branchkey=={VERSION}", cache_dir=published_clients_dir)
    except PublishedClientError as exc:
        if "could not be reached" in str(exc):
            pytest.skip(f"the package registry cannot be reached: {exc}")
        raise
    return env.python


@pytest.fixture(scope="module")
def platform(platform_factory: PlatformFactory) -> PlatformHandle:
    return platform_factory(no_amqp=True)


def _columns(rng: np.random.Generator, i: int) -> dict[str, tuple[str, list[float | None]]]:
    rows = 30 + 17 * i
    age = rng.normal(40 + 15 * i, 5 + i, rows).round(3)
    age_list: list[float | None] = [float(v) for v in age]
    for k in range(i):  # NaNs, omitted by the client's default nan_policy
        age_list[k] = None
    return {
        "age": ("float64", age_list),
        "visits": ("int64", [float(v) for v in rng.poisson(3 + i, rows)]),
        "smoker": ("bool", [float(v) for v in rng.random(rows) < 0.2 + 0.2 * i]),
    }


def test_published_client_completes_an_analytics_round(
    platform: PlatformHandle, branchkey_python: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(12)
    columns = [_columns(rng, i) for i in range(3)]
    with make_branch(platform, 3) as b:
        cfg = {
            "url": platform.url,
            "leaves": [
                {
                    k: leaf[k]
                    for k in ("id", "name", "session_token", "tree_id", "branch_id", "owner_id")
                }
                for leaf in b.leaves
            ],
            "columns": columns,
            "out": str(tmp_path / "out"),
            "uploads": str(tmp_path / "uploads"),
        }
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        (tmp_path / "run.py").write_text(_SCRIPT)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(
            [str(branchkey_python), str(tmp_path / "run.py"), str(tmp_path / "cfg.json")],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        record = b.wait(1)
    assert record["status"] == "aggregated" and record["kind"] == "federated_analytics"
    assert sorted(u["file_id"] for u in record["uploads"]) == sorted(r["file_id"] for r in report)
    assert {r["aggregation_id"] for r in report} == {record["aggregation_id"]}
    with np.load(report[0]["path"], allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    assert str(got[KIND_KEY]) == "federated_analytics" and "weighting" not in got
    derived = record["analytics"]["derived"]
    for name in ("age", "visits", "smoker"):
        dtype = columns[0][name][0]
        raw = np.concatenate(
            [
                np.array([np.nan if v is None else v for v in c[name][1]], dtype=np.float64)
                for c in columns
            ]
        )
        nan = int(np.isnan(raw).sum())
        x = raw[~np.isnan(raw)].astype(dtype).astype(np.float64)
        assert got[f"{name}_n"].tolist() == [x.size]
        assert got[f"{name}_nan"].tolist() == [nan]
        np.testing.assert_allclose(got[f"{name}_sum"], [x.sum()], rtol=1e-12)
        np.testing.assert_allclose(got[f"{name}_sumsq"], [(x * x).sum()], rtol=1e-12)
        assert got[f"{name}_min"].tolist() == [x.min()]
        assert got[f"{name}_max"].tolist() == [x.max()]
        stats = derived[name]
        assert stats["count"] == x.size and stats["nan"] == nan
        assert math.isclose(stats["mean"], x.mean(), rel_tol=1e-12)
        assert math.isclose(stats["variance"], x.var(), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(stats["std"], x.std(), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(stats["completeness"], x.size / (x.size + nan))
    assert derived["age"]["nan"] == 3  # 0 + 1 + 2 NaNs left out by the three sites
