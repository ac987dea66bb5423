"""Deterministic synthetic tabular data for federated-analytics runs.

Every site's raw columns and its custom ``save_fields`` entries are a pure function of
``(TabularSpec, site index)``: a leaf generates and reduces them, and the judge regenerates
the very same columns to pool them, so no array crosses a process.

What makes sites differ (issue 12 part 4):

- row counts drawn from a log-normal around ``rows_median`` (clipped to
  ``[rows_min, rows_max]``);
- per-site shifts: each column's site mean moves by ``shift`` x the column's scale x a
  standard-normal draw of the site;
- NaN fractions: float columns lose ``nan_fraction`` x a site factor in [0, 2) of their
  values (int and bool columns cannot hold NaN);
- columns cycle float, float, int, bool; named ``c<j>_<kind>``.

Custom entries (``site_fields``), with their operations in ``field_ops()``:
``site_rows`` (sum), ``hist_<first float column>`` (int64 histogram, sum),
``bin_edges`` (float64, must_match), ``protocol`` (unicode, must_match),
``schema_version`` (int64, must_match), ``peak_<first int column>`` (max),
``floor_<first float column>`` (min), ``any_missing`` (bool, max).

Streams: ``np.random.default_rng`` seeded from explicit integer tuples, so the same spec
gives the same values in every process (for one numpy version).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bk_sim.scenario import Scenario

__all__ = [
    "COLUMN_KINDS",
    "TabularSpec",
    "column_names",
    "field_ops",
    "site_bundle",
    "site_columns",
    "site_fields",
    "site_payload",
    "site_rows",
    "tabular_spec",
]

COLUMN_KINDS: tuple[str, ...] = ("float", "float", "int", "bool")
_HIST_BINS = 10
_PROTOCOL = "bk-sim-fa-1"
_SCHEMA_VERSION = (1, 2)
# Stream tags: the first integer after the seed says what a generator is for.
_COLUMN_PARAMS, _SITE, _VALUES = 1, 2, 3


@dataclass(frozen=True)
class TabularSpec:
    """The synthetic table of an analytics scenario (``payload.tabular`` in YAML)."""

    seed: int = 0
    columns: int = 20
    rows_median: int = 2000
    rows_sigma: float = 0.5
    rows_min: int = 50
    rows_max: int = 20_000
    shift: float = 1.0
    nan_fraction: float = 0.05
    custom_fields: bool = True

    def __post_init__(self) -> None:
        if self.columns < 1:
            raise ValueError(f"columns must be >= 1, got {self.columns}")
        if not 1 <= self.rows_min <= self.rows_median <= self.rows_max:
            raise ValueError("rows must satisfy 1 <= rows_min <= rows_median <= rows_max")
        if not 0 <= self.nan_fraction < 0.5:
            raise ValueError(f"nan_fraction must be in [0, 0.5), got {self.nan_fraction}")
        if self.rows_sigma < 0 or self.shift < 0:
            raise ValueError("rows_sigma and shift must be >= 0")


def tabular_spec(scenario: Scenario) -> TabularSpec:
    """The ``TabularSpec`` of an analytics scenario: ``payload.tabular`` seeded by the
    scenario's ``seed``. Leaves and the judge both derive it, so they agree."""
    t = scenario.payload.tabular
    return TabularSpec(
        seed=scenario.seed,
        columns=t.columns,
        rows_median=t.rows_median,
        rows_sigma=t.rows_sigma,
        rows_min=t.rows_min,
        rows_max=t.rows_max,
        shift=t.shift,
        nan_fraction=t.nan_fraction,
        custom_fields=t.custom_fields,
    )


@dataclass(frozen=True)
class _Column:
    name: str
    kind: str
    center: float  # float: mean; int: Poisson rate; bool: probability
    scale: float


def column_names(spec: TabularSpec) -> list[str]:
    return [c.name for c in _columns(spec)]


@functools.lru_cache(maxsize=32)
def _columns(spec: TabularSpec) -> tuple[_Column, ...]:
    out = []
    for j in range(spec.columns):
        kind = COLUMN_KINDS[j % len(COLUMN_KINDS)]
        rng = np.random.default_rng((spec.seed, _COLUMN_PARAMS, j))
        if kind == "float":
            center, scale = float(rng.uniform(-50, 150)), float(rng.uniform(0.5, 20))
        elif kind == "int":
            center, scale = float(rng.uniform(1, 50)), 0.0
            scale = math.sqrt(center)
        else:
            center, scale = float(rng.uniform(0.1, 0.9)), 0.1
        out.append(_Column(f"c{j:02d}_{kind}", kind, center, scale))
    return tuple(out)


def _site_draws(spec: TabularSpec, site: int) -> tuple[int, float, np.ndarray]:
    """(rows, NaN factor in [0, 2), per-column standard-normal shifts) of a site."""
    rng = np.random.default_rng((spec.seed, _SITE, site))
    rows = round(spec.rows_median * math.exp(spec.rows_sigma * float(rng.standard_normal())))
    rows = min(max(rows, spec.rows_min), spec.rows_max)
    return rows, float(rng.uniform(0, 2)), rng.standard_normal(spec.columns)


def site_rows(spec: TabularSpec, site: int) -> int:
    return _site_draws(spec, site)[0]


def site_columns(spec: TabularSpec, site: int, round: int = 1) -> dict[str, np.ndarray]:
    """The site's raw columns in a round: float64 (with NaNs), int64 and bool.

    A site keeps its row count, shifts and NaN factor in every round; its values are drawn
    afresh per round, so a site's uploads differ from round to round (an identical upload
    would be a retry of the previous round's to the platform).
    """
    rows, nan_factor, shifts = _site_draws(spec, site)
    out: dict[str, np.ndarray] = {}
    for j, col in enumerate(_columns(spec)):
        rng = np.random.default_rng((spec.seed, _VALUES, site, j, round))
        z = float(shifts[j]) * spec.shift
        if col.kind == "float":
            values = rng.standard_normal(rows)
            values *= col.scale
            values += col.center + z * col.scale
            frac = spec.nan_fraction * nan_factor
            if frac > 0:
                values[rng.random(rows) < frac] = np.nan
                if np.isnan(values).all():
                    values[0] = col.center
            out[col.name] = values
        elif col.kind == "int":
            lam = max(0.5, col.center + z * col.scale)
            out[col.name] = rng.poisson(lam, rows).astype(np.int64)
        else:
            p = min(0.99, max(0.01, col.center + z * col.scale))
            out[col.name] = rng.random(rows) < p
    return out


def _first(spec: TabularSpec, kind: str) -> _Column | None:
    return next((c for c in _columns(spec) if c.kind == kind), None)


def _bin_edges(col: _Column) -> np.ndarray:
    return np.linspace(col.center - 4 * col.scale, col.center + 4 * col.scale, _HIST_BINS + 1)


def field_ops(spec: TabularSpec) -> dict[str, str]:
    """The branch ``field_ops`` the custom entries need (bundle fields need none)."""
    if not spec.custom_fields:
        return {}
    ops = {
        "site_rows": "sum",
        "bin_edges": "must_match",
        "protocol": "must_match",
        "schema_version": "must_match",
        "any_missing": "max",
    }
    if (f := _first(spec, "float")) is not None:
        ops[f"hist_{f.name}"] = "sum"
        ops[f"floor_{f.name}"] = "min"
    if (i := _first(spec, "int")) is not None:
        ops[f"peak_{i.name}"] = "max"
    return ops


def site_fields(
    spec: TabularSpec, site: int, columns: dict[str, np.ndarray] | None = None, round: int = 1
) -> dict[str, np.ndarray]:
    """The site's custom ``save_fields`` entries (see the module docstring); ``columns``:
    the round's ``site_columns`` when the caller has them already."""
    if not spec.custom_fields:
        return {}
    cols = site_columns(spec, site, round) if columns is None else columns
    rows = site_rows(spec, site)
    fields: dict[str, np.ndarray] = {
        "site_rows": np.array([rows], np.int64),
        "protocol": np.array([_PROTOCOL]),
        "schema_version": np.array(_SCHEMA_VERSION, np.int64),
        "any_missing": np.array(
            [any(bool(np.isnan(v).any()) for v in cols.values() if v.dtype.kind == "f")]
        ),
    }
    first_float = _first(spec, "float")
    edges = _bin_edges(first_float) if first_float is not None else np.zeros(_HIST_BINS + 1)
    fields["bin_edges"] = edges
    if first_float is not None:
        x = cols[first_float.name]
        x = x[~np.isnan(x)]
        clipped = np.clip(x, edges[0], edges[-1])
        fields[f"hist_{first_float.name}"] = np.histogram(clipped, edges)[0].astype(np.int64)
        fields[f"floor_{first_float.name}"] = np.array([x.min()], np.float64)
    if (first_int := _first(spec, "int")) is not None:
        fields[f"peak_{first_int.name}"] = np.array([cols[first_int.name].max()], np.int64)
    return fields


def site_bundle(
    spec: TabularSpec, site: int, columns: dict[str, np.ndarray] | None = None, round: int = 1
) -> dict[str, np.ndarray]:
    """The six-field analytics bundle of every column, as ``save_analytics`` reduces it
    (NaNs omitted and counted)."""
    cols = site_columns(spec, site, round) if columns is None else columns
    out: dict[str, np.ndarray] = {}
    for name, raw in cols.items():
        x = raw.astype(np.float64)
        nan_mask = np.isnan(x)
        nan = int(nan_mask.sum())
        if nan:
            x = x[~nan_mask]
        out[f"{name}_n"] = np.array([x.size], np.int64)
        out[f"{name}_sum"] = np.array([x.sum()], np.float64)
        out[f"{name}_sumsq"] = np.array([np.dot(x, x)], np.float64)
        out[f"{name}_min"] = np.array([x.min()], np.float64)
        out[f"{name}_max"] = np.array([x.max()], np.float64)
        out[f"{name}_nan"] = np.array([nan], np.int64)
    return out


def site_payload(spec: TabularSpec, site: int, round: int = 1) -> dict[str, np.ndarray]:
    """Everything a site uploads in one round's FA archive: every bundle plus the custom
    entries (what a leaf hands to ``save_fields(..., kind="federated_analytics")``)."""
    cols = site_columns(spec, site, round)
    return {**site_bundle(spec, site, cols), **site_fields(spec, site, cols)}
