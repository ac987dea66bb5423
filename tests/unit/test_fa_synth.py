"""Synthetic tabular columns: deterministic from the seed, sites really differ."""

from __future__ import annotations

import numpy as np
import pytest

from bk_sim.synth import (
    TabularSpec,
    column_names,
    field_ops,
    site_bundle,
    site_columns,
    site_fields,
    site_payload,
    site_rows,
)

SPEC = TabularSpec(seed=3, columns=8, rows_median=500, rows_sigma=0.6, nan_fraction=0.1)


def test_same_spec_same_values_other_seed_other_values() -> None:
    a, b = site_payload(SPEC, 4), site_payload(TabularSpec(**{**SPEC.__dict__}), 4)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = site_columns(TabularSpec(**{**SPEC.__dict__, "seed": 4}), 4)
    assert not np.array_equal(c["c00_float"][:5], site_columns(SPEC, 4)["c00_float"][:5])


def test_columns_cycle_kinds_with_row_counts_shifts_and_nans() -> None:
    assert column_names(SPEC)[:4] == ["c00_float", "c01_float", "c02_int", "c03_bool"]
    rows = [site_rows(SPEC, s) for s in range(20)]
    assert len(set(rows)) > 10 and all(SPEC.rows_min <= r <= SPEC.rows_max for r in rows)
    cols = [site_columns(SPEC, s) for s in range(20)]
    assert [c["c00_float"].size for c in cols] == rows
    assert cols[0]["c02_int"].dtype == np.int64 and cols[0]["c03_bool"].dtype == np.bool_
    means = [np.nanmean(c["c00_float"]) for c in cols]
    assert np.std(means) > 0.5 * 1.0  # site shifts are in units of the column's scale
    nan_fracs = [np.isnan(c["c00_float"]).mean() for c in cols]
    assert 0 < np.mean(nan_fracs) < 0.3 and max(nan_fracs) > 2 * min(nan_fracs)


def test_bundle_is_the_six_fields_of_every_column() -> None:
    cols = site_columns(SPEC, 1)
    bundle = site_bundle(SPEC, 1, cols)
    x = cols["c00_float"]
    kept = x[~np.isnan(x)]
    assert bundle["c00_float_n"].tolist() == [kept.size]
    assert bundle["c00_float_nan"].tolist() == [int(np.isnan(x).sum())]
    assert bundle["c00_float_min"].tolist() == [kept.min()]
    assert bundle["c03_bool_sum"].tolist() == [float(cols["c03_bool"].sum())]
    assert len(bundle) == 6 * SPEC.columns


def test_custom_fields_have_operations_including_must_match() -> None:
    ops = field_ops(SPEC)
    fields = site_fields(SPEC, 2)
    assert set(ops) == set(fields)
    assert "must_match" in ops.values() and {"sum", "min", "max"} <= set(ops.values())
    assert fields["protocol"].dtype.kind == "U"
    assert fields["hist_c00_float"].sum() == site_bundle(SPEC, 2)["c00_float_n"][0]
    for name, op in ops.items():
        if op == "must_match":
            assert np.array_equal(site_fields(SPEC, 0)[name], site_fields(SPEC, 5)[name])
    assert site_fields(TabularSpec(custom_fields=False), 0) == {}


@pytest.mark.parametrize(
    "bad", [{"columns": 0}, {"rows_min": 10, "rows_median": 5}, {"nan_fraction": 0.7}]
)
def test_bad_specs_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TabularSpec(**bad)  # type: ignore[arg-type]


def test_rounds_redraw_values_but_keep_the_site() -> None:
    r1, r2 = site_columns(SPEC, 3, round=1), site_columns(SPEC, 3, round=2)
    assert r1["c00_float"].size == r2["c00_float"].size == site_rows(SPEC, 3)
    assert not np.array_equal(r1["c02_int"], r2["c02_int"])
    default = site_columns(SPEC, 3)  # round 1
    assert all(np.array_equal(default[k], r1[k], equal_nan=True) for k in r1)
    p2 = site_payload(SPEC, 3, round=2)
    assert np.array_equal(p2["c00_float_n"], site_bundle(SPEC, 3, round=2)["c00_float_n"])
    assert np.array_equal(p2["hist_c00_float"], site_fields(SPEC, 3, round=2)["hist_c00_float"])
