"""The federated-analytics archive format (bk_sim.analytics) and the client's FA methods.

Expected values are computed by hand in the comments; every refusal of the contract
(FEDERATED-ANALYTICS.md) has a case that says which message it gives.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bk_sim import analytics as fa
from bk_sim.client import (
    ANALYTICS_BUNDLE_SUFFIXES,
    NAN_POLICY_OMIT,
    NAN_POLICY_RAISE,
    PAYLOAD_KIND_FEDERATED_ANALYTICS,
    PAYLOAD_KIND_FEDERATED_LEARNING,
    Client,
)
from bk_sim.errors import AnalyticsError, WeightsFormatError


def _load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# --------------------------------------------------------------------------- constants


def test_constants_are_the_contracts() -> None:
    assert PAYLOAD_KIND_FEDERATED_LEARNING == "federated_learning"
    assert PAYLOAD_KIND_FEDERATED_ANALYTICS == "federated_analytics"
    assert ANALYTICS_BUNDLE_SUFFIXES == ("n", "sum", "sumsq", "min", "max", "nan")
    assert (NAN_POLICY_OMIT, NAN_POLICY_RAISE) == ("omit", "raise")
    assert fa.PAYLOAD_KIND_KEY == "__bk_payload_kind__"
    assert {fa.default_op(f"age_{s}") for s in ("n", "sum", "sumsq", "nan")} == {"sum"}
    assert (fa.default_op("age_min"), fa.default_op("age_max")) == ("min", "max")
    assert fa.default_op("target_spacing") is None and fa.default_op("_n") is None
    assert fa.bundle_suffix("x_sumsq") == "sumsq" and fa.bundle_suffix("x_sum") == "sum"


# --------------------------------------------------------------------------- the bundle


def test_bundle_of_a_column_with_a_nan_omitted() -> None:
    # [1, 2, NaN, 4] -> n 3, sum 1+2+4 = 7, sumsq 1+4+16 = 21, min 1, max 4, nan 1
    with pytest.warns(UserWarning, match=r"column 'x': 1 of 4 values are NaN"):
        got = fa.bundle("x", [1.0, 2.0, np.nan, 4.0])
    assert list(got) == [f"x_{s}" for s in ANALYTICS_BUNDLE_SUFFIXES]
    assert {k: v.tolist() for k, v in got.items()} == {
        "x_n": [3],
        "x_sum": [7.0],
        "x_sumsq": [21.0],
        "x_min": [1.0],
        "x_max": [4.0],
        "x_nan": [1],
    }
    assert got["x_n"].dtype == got["x_nan"].dtype == np.int64
    assert {got[f"x_{s}"].dtype for s in ("sum", "sumsq", "min", "max")} == {np.dtype("f8")}


def test_bundle_nan_count_is_written_as_zero_under_raise() -> None:
    got = fa.bundle("age", np.array([30, 40], np.int32), NAN_POLICY_RAISE)
    assert got["age_nan"].tolist() == [0] and got["age_n"].tolist() == [2]
    assert got["age_sumsq"].tolist() == [2500.0]  # 900 + 1600


def test_bundle_of_bool_and_of_large_ints_does_not_overflow() -> None:
    # bools as 0/1: [T, F, T] -> n 3, sum 2, sumsq 2, min 0, max 1
    b = fa.bundle("flag", np.array([True, False, True]))
    assert [b[f"flag_{s}"].item() for s in ANALYTICS_BUNDLE_SUFFIXES] == [3, 2, 2, 0, 1, 0]
    # int32 squares would wrap: 50000^2 = 2.5e9 > 2^31; two of them sum to 5e9
    big = fa.bundle("v", np.array([50000, 50000], np.int32))
    assert big["v_sumsq"].item() == 5.0e9


def test_pooled_statistics_come_from_sums_not_from_site_statistics() -> None:
    # Site A [10,10,10], site B [90,90,90]: each variance 0; pooled mean 50, variance 1600
    a = fa.bundle("y", [10, 10, 10])
    b = fa.bundle("y", [90, 90, 90])
    ops = {"sum": np.add, "min": np.minimum, "max": np.maximum}
    pooled = {k: ops[fa.default_op(k) or "sum"](a[k], b[k]) for k in a}
    stats = fa.derived_statistics(pooled, "y")
    assert stats == {
        "count": 6.0,
        "sum": 300.0,
        "min": 10.0,
        "max": 90.0,
        "range": 80.0,
        "mean": 50.0,
        "variance": 1600.0,  # 24600/6 - 50^2 = 4100 - 2500
        "std": 40.0,
        "completeness": 1.0,
    }


def test_completeness_counts_the_nans_left_out() -> None:
    with pytest.warns(UserWarning):
        got = fa.bundle("z", [1.0, np.nan, np.nan, 3.0])
    assert fa.derived_statistics(got, "z")["completeness"] == 0.5  # 2 / (2 + 2)


@pytest.mark.parametrize(
    ("values", "policy", "message"),
    [
        ([1.0, np.inf], NAN_POLICY_OMIT, "column 'c' holds 1 infinite value"),
        ([1.0, -np.inf], NAN_POLICY_RAISE, "infinite"),
        ([1.0, np.nan], NAN_POLICY_RAISE, "column 'c' holds 1 NaN value.*'raise'"),
        ([], NAN_POLICY_OMIT, "column 'c' is empty"),
        ([[1.0, 2.0]], NAN_POLICY_OMIT, r"must be 1-D, got shape \(1, 2\)"),
        (np.float64(3.0), NAN_POLICY_OMIT, r"must be 1-D, got shape \(\)"),
        (["a", "b"], NAN_POLICY_OMIT, "dtype <U1; save_analytics takes bool, int or float"),
        ([1 + 2j], NAN_POLICY_OMIT, "dtype complex128"),
        (np.array([1, None], dtype=object), NAN_POLICY_OMIT, "dtype object"),
        ([1.0], "drop", "nan_policy must be one of omit, raise"),
    ],
)
def test_bundle_refusals(values: Any, policy: str, message: str) -> None:
    with pytest.raises(AnalyticsError, match=message):
        fa.bundle("c", values, policy)


def test_an_all_nan_column_is_refused_after_dropping() -> None:
    with (
        pytest.warns(UserWarning),
        pytest.raises(AnalyticsError, match="column 'c' holds only NaN values"),
    ):
        fa.bundle("c", [np.nan, np.nan])


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({}, "columns is empty"),
        ([("age", [1])], "columns must be a dict"),
        ({"age": [1], "age_n": [2]}, "column 'age_n' collides with a bundle field of column 'age'"),
        ({"weighting": [1]}, "'weighting' is reserved"),
        ({"layer_3": [1]}, "layer_<n> namespace"),
        ({"": [1]}, "non-empty strings"),
    ],
)
def test_analytics_fields_refusals(columns: Any, message: str) -> None:
    with pytest.raises(AnalyticsError, match=message):
        fa.analytics_fields(columns)


# --------------------------------------------------------------------------- save_fields


def test_encode_fields_writes_the_kind_a_zero_weighting_and_1d_values() -> None:
    arrays = _load(fa.encode_fields({"n_cases": 312, "spacing": [1.0, 0.8], "site": "a"}))
    assert str(arrays["__bk_payload_kind__"]) == "federated_analytics"
    assert arrays["__bk_payload_kind__"].ndim == 0
    assert arrays["weighting"].tolist() == [0.0] and arrays["weighting"].dtype == np.float64
    assert arrays["n_cases"].tolist() == [312] and arrays["n_cases"].ndim == 1
    assert arrays["spacing"].tolist() == [1.0, 0.8]
    assert arrays["site"].tolist() == ["a"]
    assert fa.validate_payload(arrays) == "federated_analytics"


def test_a_learning_fields_archive_keeps_its_weighting_and_named_layers() -> None:
    data = fa.encode_fields({"bn1.weight": np.ones(3)}, kind="federated_learning", weighting=5)
    arrays = _load(data)
    assert str(arrays["__bk_payload_kind__"]) == "federated_learning"
    assert arrays["weighting"].tolist() == [5.0]


@pytest.mark.parametrize(
    ("entries", "kind", "weighting", "message"),
    [
        ({"a": 1}, "federated_gossip", None, "kind must be one of"),
        ({}, "federated_analytics", None, "entries is empty"),
        ([("a", 1)], "federated_analytics", None, "entries must be a dict"),
        ({"weighting": 1}, "federated_analytics", None, "'weighting' is reserved"),
        ({"__bk_payload_kind__": 1}, "federated_analytics", None, "is reserved"),
        ({"layer_0": 1}, "federated_analytics", None, "layer_<n> namespace"),
        ({"layer_12": 1}, "federated_learning", 1.0, "layer_<n> namespace"),
        ({"": 1}, "federated_analytics", None, "non-empty strings"),
        ({"o": np.array([{}], dtype=object)}, "federated_analytics", None, "dtype object"),
        ({"o": [{"a": 1}]}, "federated_analytics", None, "dtype object"),
        ({"d": np.array(["2024-01-01"], "M8[D]")}, "federated_analytics", None, "datetime"),
        ({"v": np.zeros(1, "V4")}, "federated_analytics", None, "void"),
        ({"a": 1}, "federated_learning", None, "needs an explicit weighting"),
        ({"a": 1}, "federated_learning", float("nan"), "finite and > 0"),
        ({"a": 1}, "federated_analytics", "x", "weighting must be a number"),
    ],
)
def test_save_fields_refusals(entries: Any, kind: str, weighting: Any, message: str) -> None:
    with pytest.raises(AnalyticsError, match=message):
        fa.encode_fields(entries, kind, weighting)


# --------------------------------------------------------------------------- validation


def _kind(kind: str) -> np.ndarray:
    return np.array(kind)


@pytest.mark.parametrize(
    ("arrays", "error", "message"),
    [
        ({"layer_0": np.ones(2)}, WeightsFormatError, "no 'weighting'"),
        ({"weighting": np.ones(1)}, WeightsFormatError, "no layer_"),
        ({"__bk_payload_kind__": _kind("x"), "a": np.ones(1)}, AnalyticsError, "must be one of"),
        (
            {"__bk_payload_kind__": np.array(["a", "b"]), "a": np.ones(1)},
            AnalyticsError,
            "must be one string",
        ),
        (
            {"__bk_payload_kind__": _kind("federated_analytics"), "weighting": np.zeros(1)},
            AnalyticsError,
            "no named fields",
        ),
        (
            {"__bk_payload_kind__": _kind("federated_analytics"), "layer_1": np.ones(1)},
            AnalyticsError,
            "positional layer name",
        ),
        (
            {"__bk_payload_kind__": _kind("federated_analytics"), "x": np.array(1)},
            AnalyticsError,
            "0-d",
        ),
        (
            {
                "__bk_payload_kind__": _kind("federated_analytics"),
                "x": np.array(["2024-01-01"], "M8[D]"),
            },
            AnalyticsError,
            "dtype datetime64",
        ),
    ],
)
def test_validation_is_chosen_by_kind(
    arrays: dict[str, np.ndarray], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        fa.validate_payload(arrays)


def test_a_learning_archive_written_by_save_weights_validates_as_learning(
    tmp_path: Path,
) -> None:
    path = Client.save_weights(str(tmp_path / "w"), 3.0, [np.ones((2, 2))])
    assert fa.validate_archive(path) == "federated_learning"


# --------------------------------------------------------------------------- the client methods


def test_client_save_analytics_writes_only_the_bundle(tmp_path: Path) -> None:
    raw = np.array([31.5, 47.25, np.nan, 62.0])
    with pytest.warns(UserWarning, match="'age': 1 of 4"):
        path = Client.save_analytics(
            {"age": raw, "ok": [True, False]}, file_path=str(tmp_path / "stats")
        )
    assert isinstance(path, str) and path.endswith("stats.npz")
    arrays = _load(Path(path).read_bytes())
    assert sorted(arrays) == sorted(
        ["__bk_payload_kind__", "weighting"]
        + [f"{c}_{s}" for c in ("age", "ok") for s in ANALYTICS_BUNDLE_SUFFIXES]
    )
    assert arrays["age_sum"].item() == 140.75  # 31.5 + 47.25 + 62
    for raw_value in (31.5, 47.25, 62.0):  # no raw value is stored, only reductions
        assert all(raw_value not in v.tolist() for k, v in arrays.items() if "_s" in k)
    with open(path, "rb") as f:
        assert Client.validate_weight_shape(f)


def test_client_save_fields_returns_a_str_and_appends_npz(tmp_path: Path) -> None:
    path = Client.save_fields({"num_channels": 4}, file_path=str(tmp_path / "f.npz"))
    assert path == str(tmp_path / "f.npz")
    with pytest.raises(AnalyticsError, match="needs an explicit weighting"):
        Client.save_fields({"a": 1}, PAYLOAD_KIND_FEDERATED_LEARNING, str(tmp_path / "g"))
    assert not (tmp_path / "g.npz").exists()
