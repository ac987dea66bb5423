"""Federated analytics on the reference platform over raw HTTP (WebSocket-only platform,
real server on loopback): combined fields and derived statistics against numpy, the round
kind, the frozen schema, every refusal with its reason code, exact integer sums, the
analytics faults, and ``create-branch --field-op``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bk_sim.cli import main
from bk_sim.platform import PlatformHandle, start_platform
from tests.conftest import PlatformFactory
from tests.integration._fa_support import (
    KIND_KEY,
    bundle,
    download_fields,
    fa_archive,
    post_fa,
)
from tests.integration._platform_support import make_branch

OPS = {"hist": "sum", "version": "must_match", "peak": "max", "first_seen": "min", "any": "max"}


@pytest.fixture(scope="module")
def platform(platform_factory: PlatformFactory) -> PlatformHandle:
    """A WebSocket-only platform: FA needs no broker (the 3.0.1 client has no AMQP)."""
    return platform_factory(no_amqp=True)


def _site(i: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    col = rng.normal(10 + 80 * i, 1 + i, 40 + 13 * i)
    col[:i] = np.nan
    fields = {
        **bundle("age", col),
        "hist": np.array([[1, 2], [3, 4]], np.int64) * (i + 1),
        "version": np.array(["v3"]),
        "peak": np.array([i, 10 - i], np.int32),
        "first_seen": np.array([100.0 - i], np.float32),
        "any": np.array([i == 1]),
    }
    return fields, col


def _refusal(resp: object) -> str:
    r = resp  # requests.Response
    assert r.status_code == 400, (r.status_code, r.text)  # type: ignore[attr-defined]
    return str(r.json()["error"])  # type: ignore[attr-defined]


def test_analytics_round_combines_fields_and_derives_statistics(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(3)
    with make_branch(platform, 3, field_ops=OPS) as b:
        sites = [_site(i, rng) for i in range(3)]
        for i, (fields, _) in enumerate(sites):
            resp = post_fa(platform.url, b.leaves[i], fa_archive(fields))  # weighting 0.0
            assert resp.status_code == 201, resp.text
        record = b.wait(1)
        assert record["status"] == "aggregated", record
        assert record["kind"] == "federated_analytics"
        assert record["strategy"] == "field_ops"
        assert [u["weighting"] for u in record["uploads"]] == [0.0, 0.0, 0.0]
        got = download_fields(platform.url, b.leaves[2], record["aggregation_id"])
        assert "weighting" not in got
        assert str(got[KIND_KEY]) == "federated_analytics"
        pooled = np.concatenate([c for _, c in sites])
        x = pooled[~np.isnan(pooled)]
        assert got["age_n"].dtype == np.int64 and got["age_n"].tolist() == [x.size]
        assert got["age_nan"].tolist() == [3]
        np.testing.assert_allclose(got["age_sum"], [x.sum()], rtol=1e-12)
        np.testing.assert_allclose(got["age_sumsq"], [(x * x).sum()], rtol=1e-12)
        assert got["age_min"].tolist() == [x.min()] and got["age_max"].tolist() == [x.max()]
        assert got["hist"].tolist() == [[6, 12], [18, 24]]
        assert got["version"].tolist() == ["v3"]
        assert got["peak"].dtype == np.int32 and got["peak"].tolist() == [2, 10]
        assert got["first_seen"].dtype == np.float32 and got["first_seen"].tolist() == [98.0]
        assert got["any"].tolist() == [True]
        stats = record["analytics"]["derived"]["age"]
        assert stats["count"] == x.size and stats["nan"] == 3
        assert math.isclose(stats["mean"], x.mean(), rel_tol=1e-12)
        assert math.isclose(stats["variance"], x.var(), rel_tol=1e-9)
        assert math.isclose(stats["std"], x.std(), rel_tol=1e-9)
        assert stats["min"] == x.min() and stats["max"] == x.max()
        assert math.isclose(stats["range"], x.max() - x.min())
        assert math.isclose(stats["completeness"], x.size / (x.size + 3))
        fields = record["analytics"]["fields"]
        assert fields["hist"] == {"op": "sum", "dtype": "<i8", "shape": [2, 2]}
        assert fields["age_min"]["op"] == "min" and fields["version"]["op"] == "must_match"


def test_sums_are_pooled_not_statistics(platform: PlatformHandle) -> None:
    """The contract's example: variances 0 at means 10 and 90 pool to 1600."""
    with make_branch(platform, 2) as b:
        for i, value in enumerate((10.0, 90.0)):
            data = fa_archive(bundle("x", np.full(3, value)))
            assert post_fa(platform.url, b.leaves[i], data).status_code == 201
        stats = b.wait(1)["analytics"]["derived"]["x"]
        assert stats["mean"] == 50.0 and stats["variance"] == 1600.0 and stats["std"] == 40.0


def test_integer_sums_are_exact_and_overflow_fails_the_round(platform: PlatformHandle) -> None:
    big = 2**53 + 1  # float64 would round it
    with make_branch(platform, 2, field_ops={"count": "sum"}) as b:
        for i in range(2):
            data = fa_archive({"count": np.array([big, 1], np.int64)})
            assert post_fa(platform.url, b.leaves[i], data).status_code == 201
        rec = b.wait(1)
        got = download_fields(platform.url, b.leaves[0], rec["aggregation_id"])
        assert got["count"].tolist() == [2 * big, 2]
        # same run, same schema: a sum past int64 fails the round, naming the field
        for i in range(2):
            data = fa_archive({"count": np.array([2**62 + i, 1], np.int64)})
            assert post_fa(platform.url, b.leaves[i], data).status_code == 201
        rec = b.wait(2)
        assert rec["status"] == "failed"
        assert rec["error"].startswith("integer_overflow") and "'count'" in rec["error"]


def test_round_takes_the_kind_of_its_first_upload(platform: PlatformHandle) -> None:
    rng = np.random.default_rng(0)
    with make_branch(platform, 2) as b:
        assert b.upload(0, 1.0, [rng.standard_normal(3)]).status_code == 201
        err = _refusal(post_fa(platform.url, b.leaves[1], fa_archive(bundle("a", np.ones(2)))))
        assert "round_kind_mismatch" in err
    with make_branch(platform, 2) as b:
        assert post_fa(platform.url, b.leaves[0], fa_archive(bundle("a", np.ones(2)))).ok
        err = _refusal(b.upload(1, 1.0, [rng.standard_normal(3)]))
        assert "round_kind_mismatch" in err


def test_archive_and_metadata_kinds_must_agree(platform: PlatformHandle) -> None:
    with make_branch(platform, 2) as b:
        data = fa_archive(bundle("a", np.ones(2)))
        err = _refusal(post_fa(platform.url, b.leaves[0], data, meta_kind="federated_learning"))
        assert "kind_mismatch" in err
        err = _refusal(post_fa(platform.url, b.leaves[0], data, meta_kind="stats"))
        assert "unknown_kind" in err
        # an FA archive whose metadata declares nothing is judged by the archive's kind
        assert post_fa(platform.url, b.leaves[0], data, meta_kind=None).status_code == 201


@pytest.mark.parametrize(
    ("second", "code"),
    [
        ({"a_n": [1], "a_sum": [1.0]}, "field_missing"),
        ({**bundle("a", np.ones(2)), "a_extra_n": [1]}, "unexpected_field"),
        ({**bundle("a", np.ones(2)), "a_n": np.array([1], np.int32)}, "dtype_mismatch"),
        ({**bundle("a", np.ones(2)), "a_n": np.array([1, 1], np.int64)}, "shape_mismatch"),
        ({**bundle("a", np.ones(2)), "version": np.array(["v4"])}, "must_match"),
    ],
)
def test_uploads_against_the_frozen_schema_are_refused_by_reason(
    platform: PlatformHandle, second: dict[str, object], code: str
) -> None:
    with make_branch(platform, 3, field_ops={"version": "must_match"}) as b:
        first = {**bundle("a", np.ones(2)), "version": np.array(["v3"])}
        assert post_fa(platform.url, b.leaves[0], fa_archive(first)).status_code == 201
        if "version" not in second:
            second = {**second, "version": np.array(["v3"])}
        err = _refusal(post_fa(platform.url, b.leaves[1], fa_archive(second)))
        assert f": {code}: " in err, err
        assert b.admin.rounds(b.branch_id)[0]["status"] == "open"  # nothing poisoned


@pytest.mark.parametrize(
    ("fields", "kw", "code"),
    [
        ({"custom": [1.0]}, {}, "unassigned_field"),
        ({"a_n": np.array(3, np.int64)}, {}, "scalar_field"),
        ({"layer_0": [1.0]}, {}, "positional_field"),
        ({"a_sum": [np.nan]}, {}, "non_finite"),
        ({"a_sum": [1.0]}, {"weighting": None}, "missing_weighting"),
        ({}, {}, "no_fields"),
        ({"t_min": np.array([1], "datetime64[s]")}, {}, "unsupported_dtype"),
        ({"s_max": np.array(["x"])}, {}, "invalid_operation"),
    ],
)
def test_archive_checks_refuse_with_reason_codes(
    platform: PlatformHandle, fields: dict[str, object], kw: dict[str, object], code: str
) -> None:
    with make_branch(platform, 2) as b:
        err = _refusal(post_fa(platform.url, b.leaves[0], fa_archive(fields, **kw)))  # type: ignore[arg-type]
        assert f": {code}: " in err, err
        assert b.admin.rounds(b.branch_id) == []  # a refused first upload opens no round


def test_schema_is_frozen_per_run_and_a_new_run_takes_a_new_one(
    platform: PlatformHandle,
) -> None:
    with make_branch(platform, 1) as b:
        assert post_fa(platform.url, b.leaves[0], fa_archive(bundle("a", np.ones(2)))).ok
        b.wait(1)
        err = _refusal(post_fa(platform.url, b.leaves[0], fa_archive(bundle("b", np.ones(2)))))
        assert "field_missing" in err
        b.admin.set_run_status(b.branch_id, "stop")
        b.admin.set_run_status(b.branch_id, "start")
        assert post_fa(platform.url, b.leaves[0], fa_archive(bundle("b", np.ones(2)))).ok
        assert b.wait(2)["analytics"]["derived"]["b"]["count"] == 2


def test_field_ops_config_is_checked(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        from bk_sim.errors import PlatformError

        for bad in ({"x": "mean"}, {"weighting": "sum"}, {"layer_3": "sum"}, ["x"]):
            with pytest.raises(PlatformError, match="field_ops"):
                b.admin.set_config(b.branch_id, field_ops=bad)
        assert b.admin.set_config(b.branch_id, field_ops={"x": "max"})["field_ops"] == {"x": "max"}
        assert b.admin.config(b.branch_id)["field_ops"] == {"x": "max"}


@pytest.mark.parametrize("fault", ["drop_leaf", "double_count", "nan_poisoned", "mean_of_means"])
def test_analytics_faults_change_the_aggregate(platform: PlatformHandle, fault: str) -> None:
    with make_branch(platform, 2) as b:
        b.admin.set_faults(b.branch_id, {"analytics": fault})
        for i, value in enumerate((10.0, 90.0)):
            data = fa_archive(bundle("x", np.full(2 + i, value)))
            assert post_fa(platform.url, b.leaves[i], data).status_code == 201
        rec = b.wait(1)
        assert rec["status"] == "aggregated" and rec["fault"]["analytics"] == fault
        got = download_fields(platform.url, b.leaves[0], rec["aggregation_id"])
        honest_sum = 2 * 10.0 + 3 * 90.0
        ids = [leaf["id"] for leaf in b.leaves]
        victim_n = 2 + ids.index(min(ids))  # the victim is the smallest leaf id
        if fault in ("drop_leaf", "double_count", "nan_poisoned"):
            assert rec["fault"]["victim_leaf_id"] == min(ids)
        if fault == "drop_leaf":
            assert got["x_n"].tolist() == [5 - victim_n]
        elif fault == "double_count":
            assert got["x_n"].tolist() == [5 + victim_n]
        elif fault == "nan_poisoned":
            assert np.isnan(got["x_sum"][0]) and rec["fault"]["victim_field"] == "x_sum"
        else:
            assert got["x_n"].tolist() == [5] and got["x_sum"][0] == 50.0 * 5 != honest_sum


def test_create_branch_cli_sets_field_ops(platform: PlatformHandle, tmp_path: Path) -> None:
    out = tmp_path / "leaves.json"
    base = ["platform", "create-branch", "--url", platform.url, "--leaves", "1", "--out", str(out)]
    env = {"BK_SIM_ADMIN_TOKEN": platform.admin_token}
    ops = ["--field-op", "hist=sum", "--field-op", "version=must_match"]
    ok = CliRunner().invoke(main, [*base, *ops], env=env)
    assert ok.exit_code == 0, ok.output
    branch_id = json.loads(out.read_text())[0]["branch_id"]
    assert platform.admin.config(branch_id)["field_ops"] == {"hist": "sum", "version": "must_match"}
    for bad_op in ("hist=avg", "hist", "layer_0=sum"):
        bad = CliRunner().invoke(main, [*base, "--field-op", bad_op], env=env)
        assert bad.exit_code == 2 and "--field-op" in bad.output, bad.output
        assert bad.exception is None or isinstance(bad.exception, SystemExit)


def test_learning_and_analytics_branches_side_by_side(platform: PlatformHandle) -> None:
    """One platform, one learning and one analytics branch, uploads interleaved."""
    from tests.integration._platform_support import assert_layers, model, reference

    rng = np.random.default_rng(5)
    with make_branch(platform, 2) as fl, make_branch(platform, 2, field_ops=OPS) as fa:
        models = [model(rng) for _ in range(2)]
        sites = [_site(i, rng) for i in range(2)]
        for i in range(2):
            fl.upload_ok(i, float(i + 1), models[i])
            assert post_fa(platform.url, fa.leaves[i], fa_archive(sites[i][0])).status_code == 201
        fl_rec, fa_rec = fl.wait(1), fa.wait(1)
        assert (fl_rec["kind"], fl_rec["strategy"]) == ("federated_learning", "fedavg")
        assert (fa_rec["kind"], fa_rec["strategy"]) == ("federated_analytics", "field_ops")
        assert_layers(fl.download(1, fl_rec["aggregation_id"]), reference("fedavg", [1, 2], models))
        got = download_fields(platform.url, fa.leaves[1], fa_rec["aggregation_id"])
        assert got["hist"].tolist() == [[3, 6], [9, 12]]
        assert got["age_n"].tolist() == [sum(int(s[0]["age_n"][0]) for s in sites)]
        # a second round on each, again interleaved, keeps both kinds apart
        fl.upload_ok(0, 1.0, models[1])
        assert post_fa(platform.url, fa.leaves[0], fa_archive(sites[1][0])).status_code == 201
        fl.upload_ok(1, 1.0, models[0])
        assert post_fa(platform.url, fa.leaves[1], fa_archive(sites[0][0])).status_code == 201
        assert fl.wait(2)["status"] == "aggregated" and fa.wait(2)["status"] == "aggregated"
        assert "analytics" not in fl.wait(2)


def test_an_open_analytics_round_survives_a_platform_restart(tmp_path: Path) -> None:
    """Schema, must_match reference and uploads are in SQLite: a restart resumes them."""
    handle = start_platform(tmp_path / "data", no_amqp=True)
    try:
        with make_branch(handle, 2, field_ops={"version": "must_match"}) as b:
            first = {**bundle("a", np.arange(4.0)), "version": np.array([7])}
            assert post_fa(handle.url, b.leaves[0], fa_archive(first)).status_code == 201
            handle.restart()
            wrong = {**bundle("a", np.arange(2.0)), "version": np.array([8])}
            assert "must_match" in _refusal(post_fa(handle.url, b.leaves[1], fa_archive(wrong)))
            right = {**bundle("a", np.arange(2.0)), "version": np.array([7])}
            assert post_fa(handle.url, b.leaves[1], fa_archive(right)).status_code == 201
            record = b.wait(1)
            assert record["analytics"]["derived"]["a"]["count"] == 6
    finally:
        handle.stop()
