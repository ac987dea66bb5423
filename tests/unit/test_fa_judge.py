"""The federated-analytics judge against the platform's own combining code: an honest
round passes; each analytics fault fails with forensics naming the leaf or the field."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pytest

from bk_sim.platform._analytics import (
    FEDERATED_ANALYTICS,
    PAYLOAD_KIND_KEY,
    FieldsInfo,
    FieldSpec,
    combine,
    derived_stats,
    freeze_schema,
)
from bk_sim.synth import TabularSpec, field_ops, site_columns, site_fields, site_payload
from bk_sim.validate import AnalyticsJudgement, judge_analytics

SPEC = TabularSpec(seed=11, columns=8, rows_median=300, rows_min=20, nan_fraction=0.1)
SITES = 6


def _round(fault: str | None, spec: TabularSpec = SPEC) -> tuple[AnalyticsJudgement, object]:
    payloads = [(f"leaf-{i}", site_payload(spec, i)) for i in range(SITES)]
    first = payloads[0][1]
    info = FieldsInfo({k: FieldSpec(v.dtype.str, v.shape) for k, v in first.items()}, first)
    schema = freeze_schema(info, field_ops(spec))
    combined = combine(payloads, schema, fault)
    aggregate = {**combined.fields, PAYLOAD_KIND_KEY: np.array(FEDERATED_ANALYTICS)}
    return (
        judge_analytics(
            _sites(spec), aggregate, field_ops=field_ops(spec), derived=derived_stats(aggregate)
        ),
        combined,
    )


def _sites(
    spec: TabularSpec,
) -> Iterator[tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]:
    for i in range(SITES):
        cols = site_columns(spec, i)
        yield f"leaf-{i}", cols, site_fields(spec, i, cols)


def test_an_honest_round_passes_every_check() -> None:
    verdict, _ = _round(None)
    assert verdict.passed, verdict.summary()
    # 8 columns x 6 fields + 10 derived stats + custom fields + layout
    assert verdict.checks > 8 * 6 + 8 * 11


@pytest.mark.parametrize("fault", ["drop_leaf", "double_count"])
def test_a_dropped_or_doubled_leaf_is_named(fault: str) -> None:
    verdict, combined = _round(fault)
    assert not verdict.passed
    victim = combined.victim_leaf_id  # type: ignore[attr-defined]
    check = "leaf_missing" if fault == "drop_leaf" else "leaf_counted_twice"
    named = [f for f in verdict.forensics if f.check == check]
    assert len(named) == 1 and named[0].leaf == victim, verdict.summary()
    assert victim in verdict.summary().splitlines()[1]  # forensics come first


def test_a_nan_in_a_sum_names_the_field() -> None:
    verdict, combined = _round("nan_poisoned")
    field = combined.victim_field  # type: ignore[attr-defined]
    assert field == "c00_float_sum"
    nan = [f for f in verdict.forensics if f.check == "non_finite"]
    assert [f.field for f in nan] == [field], verdict.summary()
    assert any(f.column == "c00_float" and f.check == "derived" for f in verdict.findings)


def test_pooled_statistics_instead_of_sums_are_named_per_column() -> None:
    verdict, _ = _round("mean_of_means")
    named = {f.column for f in verdict.forensics if f.check == "mean_of_means"}
    float_cols = {c for c in site_columns(SPEC, 0) if c.endswith(("float", "int"))}
    assert float_cols <= named, verdict.summary()
    assert any(f.field == "c00_float:variance" for f in verdict.findings)


def test_variance_pools_sums_not_statistics() -> None:
    """The contract's example: two sites of variance 0 at 10 and 90 pool to 1600."""
    sites = [("a", {"x": np.full(3, 10.0)}, {}), ("b", {"x": np.full(3, 90.0)}, {})]
    honest = {
        "x_n": np.array([6]),
        "x_nan": np.array([0]),
        "x_sum": np.array([300.0]),
        "x_sumsq": np.array([24600.0]),
        "x_min": np.array([10.0]),
        "x_max": np.array([90.0]),
        PAYLOAD_KIND_KEY: np.array(FEDERATED_ANALYTICS),
    }
    assert judge_analytics(sites, honest, derived=derived_stats(honest)).passed
    wrong = dict(derived_stats(honest))
    wrong["x"] = {**wrong["x"], "variance": 0.0, "std": 0.0}
    verdict = judge_analytics(sites, honest, derived=wrong)
    assert {f.field for f in verdict.findings} == {"x:variance", "x:std"}


def test_floats_within_the_summation_bound_pass_and_just_outside_fail() -> None:
    rng = np.random.default_rng(0)
    cols = [rng.normal(1e6, 1.0, 1000) for _ in range(3)]
    sites = [(f"s{i}", {"x": c}, {}) for i, c in enumerate(cols)]
    pooled = np.concatenate(cols)
    agg = {
        "x_n": np.array([3000]),
        "x_nan": np.array([0]),
        "x_sum": np.array([float(pooled.sum())]),
        "x_sumsq": np.array([float(np.dot(pooled, pooled))]),
        "x_min": np.array([pooled.min()]),
        "x_max": np.array([pooled.max()]),
        PAYLOAD_KIND_KEY: np.array(FEDERATED_ANALYTICS),
    }
    assert judge_analytics(sites, agg).passed
    tol = (1000 + 3 + 2) * 2.0**-53 * float(np.abs(pooled).sum())
    agg["x_sum"] = np.array([float(pooled.sum()) + 3 * tol])
    verdict = judge_analytics(sites, agg)
    assert [f.field for f in verdict.findings if f.check == "tolerance"] == ["x_sum"]


def test_missing_unexpected_and_wrong_kind_fields_are_findings() -> None:
    sites = [("a", {"x": np.arange(3.0)}, {"flag": np.array([1])})]
    agg = {"x_n": np.array([3]), "rogue": np.array([1])}
    verdict = judge_analytics(sites, agg, field_ops={"flag": "sum"})
    checks = {f.check for f in verdict.findings}
    assert {"kind", "unexpected_field", "field_missing"} <= checks
    assert any(f.field == "rogue" for f in verdict.findings)
    assert verdict.to_json()["passed"] is False


def test_histograms_and_the_distribution_plot() -> None:
    from bk_sim.report._fa_plots import analytics_distribution_plot
    from bk_sim.validate import column_histograms

    verdict, _ = _round(None)
    assert verdict.pooled["c00_float"]["count"] == sum(
        int(site_payload(SPEC, s)["c00_float_n"][0]) for s in range(SITES)
    )
    hists = column_histograms(_sites(SPEC), verdict.pooled, bins=20)
    h = hists["c00_float"]
    assert len(h.edges) == 21 and sum(h.pooled) == verdict.pooled["c00_float"]["count"]
    assert set(h.sites) == {f"leaf-{i}" for i in range(SITES)}
    assert [sum(c) for c in zip(*h.sites.values(), strict=True)] == h.pooled
    assert hists["c03_bool"].edges == [-0.5, 0.5, 1.5]
    svg = analytics_distribution_plot({k: v.to_json() for k, v in hists.items()}, max_sites=3)
    assert svg.startswith("<svg") and "c00_float (3 of 6 sites)" in svg
    assert analytics_distribution_plot({}) == ""
