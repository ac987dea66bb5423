"""Reference aggregate and comparison: hand-computed values (Flower style) and the edges."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from bk_sim.errors import AggregationError
from bk_sim.scenario import LayerSpec, ModelSpec, WeightingSpec
from bk_sim.synth import leaf_update, leaf_weightings
from bk_sim.validate import compare, reference_aggregate, tolerance_for


def _pairs() -> list[tuple[float, list[np.ndarray]]]:
    # Prepare: two leaves, two layers (float32 matrix, int64 vector).
    return [
        (1.0, [np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.array([1, 2], np.int64)]),
        (3.0, [np.array([[5.0, 6.0], [7.0, 8.0]], np.float32), np.array([3, 3], np.int64)]),
    ]


def test_fedavg_hand_computed() -> None:
    ref = reference_aggregate(_pairs(), "fedavg")
    # (1 * x1 + 3 * x2) / 4
    np.testing.assert_array_equal(ref[0], [[4.0, 5.0], [6.0, 7.0]])
    np.testing.assert_array_equal(ref[1], [2.5, 2.75])
    assert all(x.dtype == np.float64 for x in ref)
    assert [d.name for d in ref.dtypes] == ["float32", "int64"]


def test_mean_median_trimmed_mean_hand_computed() -> None:
    layers = [np.array([v, 10 * v], np.float64) for v in (1.0, 2.0, 4.0, 100.0)]
    pairs = [(w, [x]) for w, x in zip((1.0, 2.0, 3.0, 4.0), layers, strict=True)]
    np.testing.assert_allclose(reference_aggregate(pairs, "mean")[0], [26.75, 267.5])
    np.testing.assert_allclose(reference_aggregate(pairs, "median")[0], [3.0, 30.0])
    np.testing.assert_allclose(reference_aggregate(pairs[:3], "median")[0], [2.0, 20.0])
    # floor(0.25 * 4) = 1 cut at each end: mean of 2 and 4
    np.testing.assert_allclose(reference_aggregate(pairs, "trimmed_mean", 0.25)[0], [3.0, 30.0])
    # floor(0.1 * 4) = 0: the plain mean
    np.testing.assert_allclose(reference_aggregate(pairs, "trimmed_mean", 0.1)[0], [26.75, 267.5])


def test_fedavg_streams_one_contribution_at_a_time() -> None:
    seen: list[int] = []

    def gen() -> Iterator[tuple[float, Sequence[np.ndarray]]]:
        for i in range(5):
            seen.append(i)
            yield float(i + 1), [np.full(3, float(i), np.float32)]

    ref = reference_aggregate(gen(), "fedavg")
    # sum((i+1) * i) / sum(i+1) = 40 / 15
    np.testing.assert_allclose(ref[0], np.full(3, 40 / 15))
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("pairs", "strategy", "message"),
    [
        ([], "fedavg", "no contributions"),
        ([(1.0, [np.zeros(2)])], "avg", "unknown strategy 'avg'"),
        ([(0.0, [np.zeros(2)])], "fedavg", "weighting must be finite and > 0"),
        ([(float("nan"), [np.zeros(2)])], "fedavg", "weighting must be finite and > 0"),
        ([(1.0, [np.zeros(2)]), (1.0, [np.zeros(3)])], "mean", "contribution 1, layer_0"),
        ([(1.0, [np.zeros(2)]), (1.0, [np.zeros(2), np.zeros(1)])], "median", "has 2 layers"),
        (
            [(1.0, [np.zeros(2, np.float32)]), (1.0, [np.zeros(2, np.float64)])],
            "fedavg",
            "differs from the first contribution's float32",
        ),
    ],
)
def test_reference_refuses_what_cannot_be_aggregated(
    pairs: list[tuple[float, list[np.ndarray]]], strategy: str, message: str
) -> None:
    with pytest.raises(AggregationError, match=message):
        reference_aggregate(pairs, strategy)


def _platform_way(pairs: list[tuple[float, list[np.ndarray]]]) -> list[np.ndarray]:
    """FedAvg as a correct platform may compute it: float64, another order, cast at the end."""
    out = []
    total = sum(w for w, _ in pairs)
    for k in range(len(pairs[0][1])):
        acc = np.zeros(pairs[0][1][k].shape, np.float64)
        for w, layers in reversed(pairs):  # a different summation order than the reference
            acc += (w / total) * layers[k].astype(np.float64)
        dtype = pairs[0][1][k].dtype
        out.append(acc.astype(dtype) if dtype.kind == "f" else np.rint(acc).astype(dtype))
    return out


def _synthetic(n: int = 10, dtype: str = "float32") -> list[tuple[float, list[np.ndarray]]]:
    model = ModelSpec(
        layers=(
            LayerSpec(shape=(64, 32), dtype=dtype),
            LayerSpec(shape=(32,), dtype=dtype),
            LayerSpec(shape=(5,), dtype="int32"),
        )
    )
    w = leaf_weightings(2, WeightingSpec(distribution="lognormal"), n)
    return [(float(w[i]), leaf_update(2, i, 1, None, model)) for i in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_correct_aggregate_computed_the_platform_way_passes(dtype: str) -> None:
    pairs = _synthetic(dtype=dtype)
    result = compare(
        reference_aggregate(pairs, "fedavg"), _platform_way(pairs), rtol=None, atol=None
    )
    assert result.passed, result.reason
    assert result.reason is None and len(result.layers) == 3
    assert all(layer.passed and layer.mismatched == 0 for layer in result.layers)


def test_a_1e3_error_on_float32_is_caught_and_located() -> None:
    pairs = _synthetic()
    actual = _platform_way(pairs)
    actual[0][7, 3] += np.float32(1e-3)
    result = compare(reference_aggregate(pairs, "fedavg"), actual, rtol=None, atol=None)
    assert not result.passed
    assert result.reason is not None and result.reason.startswith("layer_0: 1 of 2,048 values")
    assert "worst at [7, 3]" in result.reason
    assert result.layers[0].mismatched == 1 and not result.layers[0].passed
    assert result.layers[1].passed
    assert 9e-4 < result.max_abs_error < 1.1e-3


def test_float32_accumulation_error_of_one_percent_fails() -> None:
    pairs = _synthetic()
    actual = _platform_way(pairs)
    actual[1] = actual[1] * np.float32(1.01)
    assert not compare(reference_aggregate(pairs, "fedavg"), actual, rtol=None, atol=None).passed


def test_integer_layers_exact_except_at_a_half_tie() -> None:
    ref = reference_aggregate(
        [(1.0, [np.array([2, 2, 2, 0], np.int64)]), (1.0, [np.array([3, 2, 3, 1], np.int64)])],
        "mean",
    )  # 2.5, 2.0, 2.5, 0.5
    assert compare(ref, [np.array([2, 2, 2, 0])], rtol=None, atol=None).passed  # half to even
    assert compare(ref, [np.array([3, 2, 3, 1])], rtol=None, atol=None).passed  # other side of tie
    off = compare(ref, [np.array([2, 3, 2, 0])], rtol=None, atol=None)  # 2.0 is not a tie
    assert not off.passed and "the rounding rule" in (off.reason or "")
    assert not compare(ref, [np.array([4, 2, 2, 0])], rtol=None, atol=None).passed
    assert compare(ref, [np.array([2, 3, 2, 0])], rtol=None, atol=1.0).passed  # explicit atol


@pytest.mark.parametrize(
    ("actual", "fragment"),
    [
        ([np.zeros((2, 2), np.float32)], "the aggregate has 1 layers, the reference has 2"),
        ([np.zeros((2, 2), np.float32), np.zeros(3, np.int64)], "shape (3,) differs"),
        (
            [np.zeros((2, 2), np.float64), np.zeros(2, np.int64)],
            "dtype float64 differs from the uploads' float32",
        ),
        ([np.full((2, 2), np.nan, np.float32), np.zeros(2, np.int64)], "4 values are NaN"),
    ],
)
def test_mismatches_fail_with_a_reason_in_words(actual: list[np.ndarray], fragment: str) -> None:
    ref = reference_aggregate(
        [(1.0, [np.zeros((2, 2), np.float32), np.zeros(2, np.int64)])], "fedavg"
    )
    result = compare(ref, actual, rtol=None, atol=None)
    assert not result.passed
    assert result.reason is not None and fragment in result.reason, result.reason
    json.dumps(result.to_dict())  # infinities become null


def test_tolerances_are_derived_from_the_dtype_and_overridable() -> None:
    assert tolerance_for(np.dtype("float32"), None, None) == (
        float(np.finfo(np.float32).eps),
        1e-12,
    )
    assert tolerance_for(np.dtype("float16"), None, None)[0] == float(np.finfo(np.float16).eps)
    assert tolerance_for(np.dtype("float64"), None, None) == (1e-10, 1e-12)
    assert tolerance_for(np.dtype("int8"), None, None) == (0.0, 1.0)
    assert tolerance_for(np.dtype("float32"), 1e-3, None) == (1e-3, 1e-12)
    assert tolerance_for(np.dtype("float32"), None, 0.5) == (float(np.finfo(np.float32).eps), 0.5)


def test_explicit_tolerance_loosens_the_check() -> None:
    pairs = _synthetic()
    actual = _platform_way(pairs)
    actual[0][0, 0] += np.float32(1e-3)
    ref = reference_aggregate(pairs, "fedavg")
    assert compare(ref, actual, rtol=None, atol=2e-3).passed
