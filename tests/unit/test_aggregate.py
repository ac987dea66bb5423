"""The platform's aggregation engine against hand-worked answers and a plain numpy reference.

Prepare uploads as real .npz files, aggregate, assert with ``np.testing`` (Flower-style).
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from bk_sim.errors import AggregationError, PlatformError, WeightsFormatError
from bk_sim.platform import _aggregate
from bk_sim.platform._aggregate import (
    AGGREGATION_BUGS,
    STRATEGIES,
    Upload,
    aggregate,
    apply_bug,
    streaming_average,
)
from bk_sim.weights import COMPRESSIONS, read_weights, read_weights_fast, save_weights


def _uploads(
    folder: Path,
    layers: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float] | None = None,
    *,
    compression: str = "fast",
) -> list[Upload]:
    weights = [1.0] * len(layers) if weights is None else weights
    out = []
    for i, (w, leaf_layers) in enumerate(zip(weights, layers, strict=True)):
        path = save_weights(folder / f"leaf{i}", w, leaf_layers, compression=compression)
        out.append(Upload(leaf_id=f"leaf{i}", path=path, weighting=float(w)))
    return out


def _reference(stack: np.ndarray, strategy: str, weights: np.ndarray, trim: float) -> np.ndarray:
    """The straightforward float64 answer: all N in memory, numpy's own reductions."""
    stack = stack.astype(np.float64)
    if strategy == "fedavg":
        return np.average(stack, weights=weights, axis=0)
    if strategy == "mean":
        return stack.mean(axis=0)
    if strategy == "median":
        return np.median(stack, axis=0)
    k = math.floor(trim * len(stack))
    return np.sort(stack, axis=0)[k : len(stack) - k].mean(axis=0)


# --------------------------------------------------------------------------- hand-worked


def test_fedavg_two_leaves_by_hand(tmp_path: Path) -> None:
    ups = _uploads(
        tmp_path,
        [
            [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([10.0])],
            [np.array([[5.0, 6.0], [7.0, 8.0]]), np.array([20.0])],
        ],
        [1.0, 3.0],
    )
    # (1 * x + 3 * y) / 4
    got = aggregate(ups)
    np.testing.assert_array_equal(got[0], [[4.0, 5.0], [6.0, 7.0]])
    np.testing.assert_array_equal(got[1], [17.5])


def test_fedavg_of_huge_weightings_does_not_overflow(tmp_path: Path) -> None:
    """Each weighting is finite and > 0 as the contract asks; their float64 sum was inf
    and the aggregate NaN. Scaled by a power of two, the bits are also unchanged."""
    layers = [[np.array([1.0, 2.0], np.float32)], [np.array([2.0, 4.0], np.float32)]]
    got = aggregate(_uploads(tmp_path, layers, [1e308, 1e308]))[0]
    np.testing.assert_array_equal(got, np.array([1.5, 3.0], np.float32))
    rng = np.random.default_rng(3)
    leaves = [[rng.standard_normal(50).astype(np.float32)] for _ in range(3)]
    small = aggregate(_uploads(tmp_path, leaves, [3.0, 5.0, 7.0]))[0]
    big = aggregate(_uploads(tmp_path, leaves, [3.0 * 2.0**900, 5.0 * 2.0**900, 7.0 * 2.0**900]))[0]
    np.testing.assert_array_equal(small, big)


def test_mean_ignores_weighting_by_hand(tmp_path: Path) -> None:
    ups = _uploads(
        tmp_path,
        [[np.array([[1.0, 2.0], [3.0, 4.0]])], [np.array([[5.0, 6.0], [7.0, 8.0]])]],
        [1.0, 3.0],
    )
    np.testing.assert_array_equal(aggregate(ups, "mean")[0], [[3.0, 4.0], [5.0, 6.0]])


def test_median_odd_and_even_by_hand(tmp_path: Path) -> None:
    three = [
        [np.array([[1.0, 9.0], [5.0, 0.0]])],
        [np.array([[2.0, 8.0], [4.0, 0.0]])],
        [np.array([[3.0, 7.0], [6.0, 1.0]])],
    ]
    ups = _uploads(tmp_path, three, [100.0, 1.0, 1.0])
    np.testing.assert_array_equal(aggregate(ups, "median")[0], [[2.0, 8.0], [5.0, 0.0]])
    four = [*three, [np.array([[10.0, 0.0], [0.0, 0.0]])]]
    ups = _uploads(tmp_path, four)
    # columns sorted: (1,2,3,10) (0,7,8,9) (0,4,5,6) (0,0,0,1)
    np.testing.assert_array_equal(aggregate(ups, "median")[0], [[2.5, 7.5], [4.5, 0.0]])


def test_trimmed_mean_drops_extremes_by_hand(tmp_path: Path) -> None:
    values = [1.0, 100.0, 3.0, -50.0, 4.0]
    ups = _uploads(tmp_path, [[np.array([[v, 2 * v]])] for v in values])
    # trim 0.2 of 5 -> one lowest and one highest dropped: mean(1, 3, 4)
    got = aggregate(ups, "trimmed_mean", trim_fraction=0.2)[0]
    np.testing.assert_allclose(got, [[8.0 / 3.0, 16.0 / 3.0]], rtol=1e-15)
    # trim 0.1 of 5 -> floor(0.5) = 0: the plain mean
    got = aggregate(ups, "trimmed_mean", trim_fraction=0.1)[0]
    np.testing.assert_allclose(got, [[58.0 / 5.0, 116.0 / 5.0]], rtol=1e-15)


def test_integer_layers_round_half_to_even_only_at_the_end(tmp_path: Path) -> None:
    leaves = [
        [np.array([1, 2, -1, 0, 7], dtype=np.int8)],
        [np.array([2, 3, -2, 1, 8], dtype=np.int8)],
    ]
    ups = _uploads(tmp_path, leaves)
    got = aggregate(ups, "mean")[0]
    # 1.5 -> 2, 2.5 -> 2, -1.5 -> -2, 0.5 -> 0, 7.5 -> 8
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, np.array([2, 2, -2, 0, 8], dtype=np.int8))
    # fedavg: (1 * 1 + 3 * 2) / 4 = 1.75 -> 2; no rounding of the products on the way
    ups = _uploads(
        tmp_path, [[np.array([1], dtype=np.int32)], [np.array([2], dtype=np.int32)]], [1.0, 3.0]
    )
    np.testing.assert_array_equal(aggregate(ups)[0], np.array([2], dtype=np.int32))
    # median of an even count of ints: 2.5 -> 2 (half to even), 3.5 -> 4
    ups = _uploads(tmp_path, [[np.array([v, v + 1], dtype=np.uint16)] for v in (1, 2, 3, 4)])
    np.testing.assert_array_equal(aggregate(ups, "median")[0], np.array([2, 4], dtype=np.uint16))


def test_bool_layers_are_a_vote_ties_to_false(tmp_path: Path) -> None:
    leaves = [
        [np.array([True, True, False])],
        [np.array([False, True, False])],
        [np.array([True, False, False])],
    ]
    got = aggregate(_uploads(tmp_path, leaves), "mean")[0]
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, [True, True, False])
    got = aggregate(_uploads(tmp_path, leaves[:2]), "mean")[0]  # 0.5 -> False
    np.testing.assert_array_equal(got, [False, True, False])


def test_integer_result_is_clipped_to_the_dtype_range() -> None:
    values = np.array([2.0**63, -(2.0**63) - 4096.0, 1.4])
    got = _aggregate._to_dtype(values.copy(), np.dtype(np.int64))
    assert got[0] > 2**62 and got[1] == np.iinfo(np.int64).min and got[2] == 1
    got = _aggregate._to_dtype(np.array([300.0, -3.0]), np.dtype(np.uint8))
    np.testing.assert_array_equal(got, np.array([255, 0], dtype=np.uint8))


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_random_float_layers_match_the_numpy_reference(
    tmp_path: Path, strategy: str, dtype: type
) -> None:
    rng = np.random.default_rng([STRATEGIES.index(strategy), np.dtype(dtype).itemsize])
    n = 9
    shapes = [(5, 7), (13,), (), (0, 3), (2, 3, 4)]
    leaves = [[(rng.standard_normal(s) * 3).astype(dtype) for s in shapes] for _ in range(n)]
    weights = rng.uniform(0.5, 50.0, n)
    got = aggregate(_uploads(tmp_path, leaves, weights), strategy, trim_fraction=0.25)
    assert len(got) == len(shapes)
    for i, shape in enumerate(shapes):
        stack = np.stack([leaf[i] for leaf in leaves])
        ref = _reference(stack, strategy, weights, 0.25)
        assert got[i].dtype == np.dtype(dtype) and got[i].shape == shape
        if dtype is np.float64:
            np.testing.assert_allclose(got[i], ref, rtol=1e-12, atol=1e-13)
        else:  # the float64 result, cast once: at most the cast's rounding apart
            np.testing.assert_array_max_ulp(got[i], ref.astype(dtype), maxulp=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_integer_layers_match_the_rounded_reference(tmp_path: Path, strategy: str) -> None:
    rng = np.random.default_rng(7)
    n = 6
    leaves = [[rng.integers(-1000, 1000, (4, 5)).astype(np.int32)] for _ in range(n)]
    weights = rng.integers(1, 5, n).astype(float)
    got = aggregate(_uploads(tmp_path, leaves, weights), strategy, trim_fraction=0.2)[0]
    ref = _reference(np.stack([leaf[0] for leaf in leaves]), strategy, weights, 0.2)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.rint(ref).astype(np.int32))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_aggregates_the_same(tmp_path: Path, compression: str) -> None:
    rng = np.random.default_rng(3)
    leaves = [[rng.standard_normal((3, 3))] for _ in range(3)]
    ups = _uploads(tmp_path, leaves, [1.0, 2.0, 3.0], compression=compression)
    ref = np.average(np.stack([leaf[0] for leaf in leaves]), weights=[1, 2, 3], axis=0)
    np.testing.assert_allclose(aggregate(ups)[0], ref, rtol=1e-13)


def test_big_endian_upload_agrees_with_little_endian(tmp_path: Path) -> None:
    a = np.array([1.0, 2.0], dtype="<f4")
    b = np.array([3.0, 4.0], dtype=">f4")
    got = aggregate(_uploads(tmp_path, [[a], [b]]))[0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [2.0, 3.0])


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean"])
def test_blocked_and_memory_mapped_scratch_gives_the_same_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    rng = np.random.default_rng(11)
    leaves = [
        [rng.standard_normal(1001).astype(np.float32), rng.standard_normal((3, 3))]
        for _ in range(7)
    ]
    ups = _uploads(tmp_path, leaves)
    in_memory = aggregate(ups, strategy, trim_fraction=0.3)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(_aggregate, "IN_MEMORY_SCRATCH_BYTES", 0)
    monkeypatch.setattr(_aggregate, "BLOCK_BYTES", 8 * 7 * 64)  # 64 coordinates per block
    monkeypatch.setattr(_aggregate, "SCRATCH_DIR", scratch)
    blocked = aggregate(ups, strategy, trim_fraction=0.3)
    for x, y in zip(in_memory, blocked, strict=True):
        np.testing.assert_array_equal(x, y)
    assert list(scratch.iterdir()) == []  # the memory-mapped scratch is removed


@pytest.mark.parametrize("strategy", ["fedavg", "mean"])
def test_batches_and_blocks_add_up_across_their_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    monkeypatch.setattr(_aggregate, "BATCH_UPLOADS", 3)  # 10 uploads: batches 3, 3, 3, 1
    monkeypatch.setattr(_aggregate, "STAGING_BYTES", 8 * 3 * 300)  # blocks of 300 coordinates
    rng = np.random.default_rng(9)
    leaves = [
        [rng.standard_normal(1000), rng.integers(0, 9, (7, 11)).astype(np.uint8)] for _ in range(10)
    ]
    weights = rng.uniform(1.0, 9.0, 10)
    got = aggregate(_uploads(tmp_path, leaves, weights), strategy)
    for i in range(2):
        ref = _reference(np.stack([leaf[i] for leaf in leaves]), strategy, weights, 0.0)
        if i == 0:
            np.testing.assert_allclose(got[0], ref, rtol=1e-12, atol=1e-14)
        else:
            np.testing.assert_array_equal(got[1], np.rint(ref).astype(np.uint8))


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_read_ahead_threads_give_the_same_bits_and_the_first_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(_aggregate, "READ_THREADS", threads)
    monkeypatch.setattr(_aggregate, "READ_AHEAD", 3)
    monkeypatch.setattr(_aggregate, "BATCH_UPLOADS", 4)
    rng = np.random.default_rng(8)
    leaves = [[rng.standard_normal((20, 30)).astype(np.float32)] for _ in range(23)]
    weights = rng.uniform(1.0, 5.0, 23)
    ups = _uploads(tmp_path, leaves, weights)
    monkeypatch.setattr(_aggregate, "READ_THREADS", 0)
    sequential = aggregate(ups)[0]
    monkeypatch.setattr(_aggregate, "READ_THREADS", threads)
    np.testing.assert_array_equal(aggregate(ups)[0], sequential)  # same order of sums
    ups[7].path.write_bytes(b"garbage")  # the first bad upload in order...
    later = save_weights(tmp_path / "later", 1.0, [np.zeros((2, 2), dtype=np.float32)])
    ups[15] = Upload("leaf15", later, 1.0)  # ...comes before this mismatch
    for _ in range(3):
        with pytest.raises(AggregationError, match="^leaf leaf7: "):
            aggregate(ups)


def _peak_bytes(ups: Sequence[Upload], strategy: str) -> int:
    tracemalloc.start()
    try:
        aggregate(ups, strategy)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_peak_memory_does_not_grow_with_the_number_of_uploads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    monkeypatch.setattr(_aggregate, "IN_MEMORY_SCRATCH_BYTES", 0)
    monkeypatch.setattr(_aggregate, "BLOCK_BYTES", 8 * 2**10)
    layer = np.random.default_rng(5).standard_normal(25_000).astype(np.float32)  # 100 kB
    ups = _uploads(tmp_path, [[layer + i] for i in range(160)], compression="stored")
    few = _peak_bytes(ups[:64], strategy)  # from 64 uploads on, batches are full (16)
    many = _peak_bytes(ups, strategy)
    # 160 uploads hold 16 MB; streaming keeps a batch and the read-ahead, whatever N is
    assert many < few + 500_000, (few, many)  # read-ahead timing varies by ~2 uploads
    assert many < 4_000_000, many


# --------------------------------------------------------------------------- streaming core


def test_streaming_average_takes_arrays_one_at_a_time() -> None:
    rng = np.random.default_rng(2)
    leaves = [[rng.standard_normal((4, 4)).astype(np.float32)] for _ in range(5)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    got = streaming_average(iter(zip(weights, leaves, strict=True)))[0]
    ref = np.average(np.stack([x[0] for x in leaves]).astype(np.float64), weights=weights, axis=0)
    np.testing.assert_array_max_ulp(got, ref.astype(np.float32), maxulp=1)
    unweighted = streaming_average(zip(weights, leaves, strict=True), weighted=False)[0]
    np.testing.assert_allclose(
        unweighted, np.mean(np.stack([x[0] for x in leaves]), axis=0), rtol=1e-6
    )
    with pytest.raises(AggregationError, match="no uploads"):
        streaming_average([])
    with pytest.raises(AggregationError, match="upload 1: weighting"):
        streaming_average([(1.0, leaves[0]), (0.0, leaves[1])])


# --------------------------------------------------------------------------- errors


def test_errors_are_aggregation_errors_under_platform_error(tmp_path: Path) -> None:
    ups = _uploads(tmp_path, [[np.zeros(2)], [np.ones(2)]])
    with pytest.raises(AggregationError, match="no uploads"):
        aggregate([])
    with pytest.raises(AggregationError, match="unknown aggregation strategy 'krum'"):
        aggregate(ups, "krum")
    for bad in (0.5, -0.1, 0.7):
        with pytest.raises(AggregationError, match=r"trim_fraction must be in \[0, 0.5\)"):
            aggregate(ups, "trimmed_mean", trim_fraction=bad)
    assert issubclass(AggregationError, PlatformError)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mismatched_uploads_name_the_leaf_and_layer(tmp_path: Path, strategy: str) -> None:
    good = [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    cases = {
        r"leaf leaf1, layer_1: shape \(4,\) differs from leaf leaf0's \(3,\)": [
            good[0],
            np.zeros(4, dtype=np.float32),
        ],
        r"leaf leaf1, layer_0: dtype float64 differs from leaf leaf0's float32": [
            np.zeros((2, 2)),
            good[1],
        ],
        r"leaf leaf1: 1 layers, but leaf leaf0 has 2": [good[0]],
    }
    for message, second in cases.items():
        ups = _uploads(tmp_path, [good, second, good])
        with pytest.raises(AggregationError, match=message):
            aggregate(ups, strategy)


def test_unreadable_upload_and_bad_weighting_name_the_leaf(tmp_path: Path) -> None:
    ups = _uploads(tmp_path, [[np.zeros(2)], [np.ones(2)]])
    ups[1].path.write_bytes(b"not a zip")
    with pytest.raises(AggregationError, match="leaf leaf1: .*not an .npz") as info:
        aggregate(ups)
    assert isinstance(info.value.__cause__, WeightsFormatError)
    ups = _uploads(tmp_path, [[np.zeros(2)], [np.ones(2)]])
    with pytest.raises(AggregationError, match="decompresses to .* over the limit"):
        aggregate(ups, max_decompressed_bytes=100)
    bad = [ups[0], Upload("leaf9", ups[1].path, -1.0)]
    with pytest.raises(AggregationError, match="leaf leaf9: weighting must be finite and > 0"):
        aggregate(bad)
    np.testing.assert_array_equal(aggregate(bad, "mean")[0], [0.5, 0.5])  # mean ignores it


# --------------------------------------------------------------------------- self-test bugs


def _bug_uploads() -> list[Upload]:
    return [
        Upload(leaf, Path(f"/nonexistent/{leaf}.npz"), w)
        for leaf, w in (("d", 2.0), ("c", 5.0), ("b", 5.0), ("a", 1.0))
    ]


def test_apply_bug_victims_are_deterministic() -> None:
    ups = _bug_uploads()
    got, strategy, victim = apply_bug(ups, "fedavg", "unweighted")
    assert (got, strategy, victim) == (ups, "mean", "")
    got, strategy, victim = apply_bug(ups, "median", "drop_leaf")
    assert victim == "b" and strategy == "median"  # largest weighting 5.0, tie -> smallest id
    assert [u.leaf_id for u in got] == ["d", "c", "a"]
    got, strategy, victim = apply_bug(ups, "fedavg", "double_count")
    assert victim == "b" and strategy == "fedavg"
    assert [u.leaf_id for u in got] == ["d", "c", "b", "b", "a"]
    assert [u.leaf_id for u in ups] == ["d", "c", "b", "a"]  # input untouched
    with pytest.raises(AggregationError, match="unknown aggregation bug 'stale'"):
        apply_bug(ups, "fedavg", "stale")
    assert AGGREGATION_BUGS == ("unweighted", "drop_leaf", "double_count")


def test_double_count_doubles_the_victims_weight(tmp_path: Path) -> None:
    leaves = [[np.array([0.0, 10.0])], [np.array([4.0, 2.0])]]
    ups = _uploads(tmp_path, leaves, [1.0, 3.0])
    buggy, strategy, victim = apply_bug(ups, "fedavg", "double_count")
    assert victim == "leaf1"
    # (1 * x0 + 6 * x1) / 7
    np.testing.assert_allclose(aggregate(buggy, strategy)[0], [24.0 / 7.0, 22.0 / 7.0])
    dropped, strategy, _ = apply_bug(ups, "fedavg", "drop_leaf")
    np.testing.assert_array_equal(aggregate(dropped, strategy)[0], [0.0, 10.0])


# --------------------------------------------------------------------------- fast reader


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_read_weights_fast_reads_what_read_weights_reads(tmp_path: Path, compression: str) -> None:
    rng = np.random.default_rng(4)
    layers = [
        rng.standard_normal((3, 4)).astype(np.float32),
        np.arange(6, dtype=np.int16),
        np.array(5.0),
        np.zeros((0, 3)),
        np.asfortranarray(rng.standard_normal((3, 5))),
        np.array([True, False]),
    ]
    path = save_weights(tmp_path / "u", 2.5, layers, compression=compression)
    w_ref, ref = read_weights(path)
    w, got = read_weights_fast(path)
    assert w == w_ref == 2.5
    for x, y in zip(ref, got, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_read_weights_fast_refuses_corrupt_archives(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "u", 1.0, [np.arange(1000.0)], compression="stored")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside layer_0's data: the CRC no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsFormatError, match="corrupt"):
        read_weights_fast(path)
    path.write_bytes(bytes(raw[:200]))
    with pytest.raises(WeightsFormatError, match="not an .npz"):
        read_weights_fast(path)
    with pytest.raises(WeightsFormatError, match="no such file"):
        read_weights_fast(tmp_path / "missing.npz")
