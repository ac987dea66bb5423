"""The platform's federated-analytics pieces as pure functions: operations and their
defaults, exact combining per dtype, derived statistics, kinds in archive and metadata."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from bk_sim.platform._analytics import (
    AnalyticsRefusal,
    FieldsInfo,
    FieldSpec,
    check_field_ops,
    combine,
    default_op,
    derived_stats,
    freeze_schema,
    metadata_kind,
    upload_kind,
    validate_fields,
)


def _info(**fields: np.ndarray) -> FieldsInfo:
    return FieldsInfo({k: FieldSpec(v.dtype.str, v.shape) for k, v in fields.items()}, fields)


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "op"),
    [
        ("age_n", "sum"),
        ("age_sum", "sum"),
        ("age_sumsq", "sum"),
        ("age_min", "min"),
        ("age_max", "max"),
        ("age_nan", "sum"),
        ("a_b_nan", "sum"),
        ("_n", None),
        ("age", None),
        ("age_mean", None),
        ("n", None),
    ],
)
def test_bundle_suffixes_give_default_operations(name: str, op: str | None) -> None:
    assert default_op(name) == op


def test_field_ops_config_and_schema() -> None:
    assert check_field_ops({"x": "max"}) == {"x": "max"}
    with pytest.raises(ValueError, match="must be one of"):
        check_field_ops({"x": "avg"})
    info = _info(age_sum=np.ones(1), x=np.ones(2), tag=np.array(["a"]))
    schema = freeze_schema(info, {"x": "max", "tag": "must_match", "age_sum": "max"})
    assert {k: v["op"] for k, v in schema.items()} == {
        "age_sum": "max",  # the branch overrides the suffix default
        "x": "max",
        "tag": "must_match",
    }
    with pytest.raises(AnalyticsRefusal) as err:
        freeze_schema(_info(z=np.ones(1, np.complex128)), {"z": "min"})
    assert err.value.code == "invalid_operation"


def _schema(**fields: tuple[np.ndarray, str]) -> tuple[dict[str, object], list[np.ndarray]]:
    info = _info(**{k: v for k, (v, _) in fields.items()})
    return freeze_schema(info, {k: op for k, (_, op) in fields.items()}), []


def test_integers_sum_exactly_in_int64_and_overflow_is_refused() -> None:
    schema, _ = _schema(c=(np.array([1], np.int64), "sum"))
    big = [("a", {"c": np.array([2**62], np.int64)}), ("b", {"c": np.array([2**62 - 1])})]
    assert combine(big, schema).fields["c"].tolist() == [2**63 - 1]
    with pytest.raises(AnalyticsRefusal) as err:
        combine([*big, ("c", {"c": np.array([1], np.int64)})], schema)
    assert err.value.code == "integer_overflow" and "leaf c" in str(err.value)
    neg = [("a", {"c": np.array([-(2**62)], np.int64)})] * 3
    with pytest.raises(AnalyticsRefusal, match="integer_overflow"):
        combine(neg, schema)
    uschema, _ = _schema(u=(np.array([1], np.uint64), "sum"))
    with pytest.raises(AnalyticsRefusal, match="integer_overflow"):
        combine(
            [
                ("a", {"u": np.array([2**64 - 1], np.uint64)}),
                ("b", {"u": np.array([1], np.uint64)}),
            ],
            uschema,
        )
    small, _ = _schema(s=(np.array([1], np.int8), "sum"))
    with pytest.raises(AnalyticsRefusal, match="does not fit in int8"):
        combine(
            [("a", {"s": np.array([100], np.int8)}), ("b", {"s": np.array([100], np.int8)})], small
        )
    ok = combine(
        [("a", {"s": np.array([100], np.int8)}), ("b", {"s": np.array([-3], np.int8)})], small
    )
    assert ok.fields["s"].dtype == np.int8 and ok.fields["s"].tolist() == [97]


def test_dtypes_are_kept_and_bool_sums_count() -> None:
    schema, _ = _schema(
        f=(np.ones(2, np.float32), "sum"),
        z=(np.ones(1, np.complex64), "sum"),
        b=(np.ones(2, bool), "sum"),
        lo=(np.ones(2, bool), "min"),
        hi=(np.ones(2, bool), "max"),
        t=(np.array(["x"]), "must_match"),
    )
    sites = [
        (
            f"l{i}",
            {
                "f": np.array([0.1, 1e8], np.float32),
                "z": np.array([1 + 2j], np.complex64),
                "b": np.array([True, i == 0]),
                "lo": np.array([True, i == 0]),
                "hi": np.array([False, i == 0]),
                "t": np.array(["x"]),
            },
        )
        for i in range(3)
    ]
    out = combine(sites, schema).fields
    assert out["f"].dtype == np.float32 and out["f"].tolist() == [np.float32(0.1 * 3), 3e8]
    assert out["z"].dtype == np.complex64 and out["z"].tolist() == [3 + 6j]
    assert out["b"].dtype == np.int64 and out["b"].tolist() == [3, 1]
    assert out["lo"].tolist() == [True, False] and out["hi"].tolist() == [False, True]
    sites[2][1]["t"] = np.array(["y"])
    with pytest.raises(AnalyticsRefusal, match="must_match: field 't': leaf l2 differs"):
        combine(sites, schema)


def test_derived_stats_from_the_combined_bundle() -> None:
    fields = {
        "x_n": np.array([4]),
        "x_nan": np.array([1]),
        "x_sum": np.array([10.0]),
        "x_sumsq": np.array([30.0]),
        "x_min": np.array([1.0]),
        "x_max": np.array([4.0]),
        "y_n": np.array([3]),  # incomplete bundle: no statistics
    }
    stats = derived_stats(fields)
    assert list(stats) == ["x"]
    assert stats["x"] == {
        "count": 4,
        "nan": 1,
        "sum": 10.0,
        "min": 1.0,
        "max": 4.0,
        "range": 3.0,
        "mean": 2.5,
        "variance": 1.25,
        "std": 1.25**0.5,
        "completeness": 0.8,
    }
    flat = {**fields, "x_sumsq": np.array([24.999999])}  # rounding below mean^2: reported 0
    assert derived_stats(flat)["x"]["variance"] == 0.0


def test_kinds_in_archive_and_metadata() -> None:
    fa = _npz(a_n=[1], weighting=[0.0], __bk_payload_kind__="federated_analytics")
    assert upload_kind(fa, None) == "federated_analytics"
    assert upload_kind(_npz(weighting=[1.0], layer_0=[1.0]), None) == "federated_learning"
    with pytest.raises(AnalyticsRefusal, match="kind_mismatch"):
        upload_kind(fa, "federated_learning")
    with pytest.raises(AnalyticsRefusal, match="unknown_kind"):
        upload_kind(_npz(weighting=[0.0], __bk_payload_kind__="other"), None)
    with pytest.raises(AnalyticsRefusal, match="invalid_archive"):
        upload_kind(_npz(weighting=[0.0], __bk_payload_kind__=[1, 2]), None)
    assert upload_kind(b"not a zip", None) == "federated_learning"  # FL validation words it
    meta = {"leaf_name": "l", "metadata": json.dumps({"kind": "federated_analytics"})}
    assert metadata_kind(meta) == "federated_analytics"
    assert metadata_kind({"metadata": "{not json"}) is None
    assert metadata_kind({"metadata": {"kind": "federated_learning"}}) == "federated_learning"
    assert metadata_kind(None) is None
    with pytest.raises(AnalyticsRefusal, match="unknown_kind"):
        metadata_kind({"metadata": json.dumps({"kind": 3})})


def test_pickled_fields_are_refused_without_unpickling() -> None:
    buf = io.BytesIO()
    np.savez(buf, a_n=np.array([object()], dtype=object), weighting=np.zeros(1))
    with pytest.raises(AnalyticsRefusal, match="invalid_archive: cannot load without pickle"):
        validate_fields(buf.getvalue(), None)
    with pytest.raises(AnalyticsRefusal, match="over the limit"):
        validate_fields(_npz(a_n=np.zeros(1000), weighting=[0.0]), 100)
