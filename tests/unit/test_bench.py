"""``bk-sim bench aggregate`` at tiny sizes: it runs, and prints both tables with verdicts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bk_sim.bench import _aggregate as _bench
from bk_sim.cli import main


def _rows(output: str, section: str) -> list[list[str]]:
    """The data rows of one numbered section's table (header skipped)."""
    block = output.split(section, 1)[1]
    lines = block.splitlines()[1:]
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("N "))
    rows = []
    for line in lines[header + 1 :]:
        if not line.strip() or line.lstrip().startswith(("target:", "N=")):
            break
        rows.append(line.split())
    return rows


def test_bench_aggregate_prints_both_tables(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "aggregate",
            "--params",
            "2000",
            "--uploads",
            "3,12",
            "--layers",
            "3",
            "--workdir",
            str(tmp_path),
            "--repeat",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "2,000 float32 params in 3 layers, uploads 3,12, compression fast" in out
    assert "best of 2" in out
    assert re.search(r"machine: \d+ CPUs", out)
    step = _rows(out, "1. Aggregation step")
    assert [r[0] for r in step] == ["3", "12"]
    assert all(len(r) == 15 for r in step)
    assert all(r[11].endswith("x") and r[12].endswith("x") for r in step)
    assert all(float(r[14]) < 1e-5 for r in step)  # ours agrees with the naive form
    e2e = _rows(out, "2. End to end")
    assert [r[0] for r in e2e] == ["3", "12"]
    assert all(len(r) == 10 and r[7].endswith("x") and r[8].endswith("x") for r in e2e)
    assert len(re.findall(r"^target: .*(MET|NOT MET)", out, flags=re.M)) == 2
    assert list(tmp_path.iterdir()) == []  # the upload files are removed


def test_bench_aggregate_rejects_bad_counts() -> None:
    result = CliRunner().invoke(main, ["bench", "aggregate", "--uploads", "3,zero"])
    assert result.exit_code == 2
    assert "expected positive integers separated by commas" in result.output


def test_naive_is_skipped_with_a_reason_when_memory_is_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_bench, "_NAIVE_MEMORY_SHARE", 0.0)
    pool = _bench._pool(1000, 2, "random", 2)
    result = _bench.measure_step(pool, 4)
    assert result.naive_warm_s is None and result.speedup_cold is None
    assert "skipped: needs" in result.naive_skipped and "--force-naive" in result.naive_skipped
    forced = _bench.measure_step(pool, 4, force_naive=True)
    assert forced.naive_cold_s is not None and forced.max_diff is not None
    assert forced.speedup_warm is not None and forced.speedup_warm > 0
    lines = _bench.render_step([result])
    assert any("N=4: naive skipped" in line for line in lines)
    assert lines[-1].startswith("target: >= 5x faster than naive: cold NOT MEASURED")


def test_naive_fedavg_is_the_weighted_average() -> None:
    clients = [(1.0, [np.array([0.0, 4.0])]), (3.0, [np.array([4.0, 0.0])])]
    np.testing.assert_array_equal(_bench._naive_fedavg(clients)[0], [3.0, 1.0])
