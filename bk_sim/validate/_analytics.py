"""The federated-analytics judge: a platform's combined fields and derived statistics
against the pooled raw columns, regenerated locally.

Every site's raw columns are reduced once, per site (count, NaNs, sum, sum of |x|, sum of
squares, min, max, and the site's mean and centred sum of squares); the pooled reference
is assembled from those exactly the way sums pool, never from per-site statistics.

Tolerances. Integers (``_n``, ``_nan``, integer custom fields, counts) and extremes
(``_min``, ``_max``) must be exact. A float sum is compared with the error bound of the
summation that produced it: the site summed at most ``m`` values, the platform summed
``S`` site sums, and recursive summation of k terms errs by at most (k - 1) u sum(|x|)
(u = 2**-53, first order). So ``|got - ref| <= (m + S + 2) u sum(|x|)`` for ``_sum``
(``sum(x^2)`` for ``_sumsq``, one more u for squaring). The derived statistics propagate
those bounds: mean ``tol_sum / n + 2 u |mean|``; variance ``tol_sumsq / n +
(2 |mean| + tol_mean) tol_mean + 4 u (sumsq/n + mean^2)`` (the one-pass formula's
cancellation); std ``min(sqrt(tol_var), tol_var / std)``; range and completeness 2 u
relative. The reference itself is accurate far inside those bounds (pairwise sums per
site, ``math.fsum`` across sites, pooled variance by Chan's parallel formula).

Forensics name what is wrong. A count difference equal to exactly one site's counts (all
integer sum fields at once) names the leaf that was dropped or counted twice; a NaN in a
combined field names the field; a column whose counts match but whose sums equal n x the
mean of the per-site means is named as pooled statistics (mean of means).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AnalyticsFinding",
    "AnalyticsJudgement",
    "ColumnHistogram",
    "column_histograms",
    "judge_analytics",
]

U = 2.0**-53
KIND_KEY = "__bk_payload_kind__"
SUFFIXES = ("n", "sum", "sumsq", "min", "max", "nan")
FORENSIC_CHECKS = frozenset(
    {"leaf_missing", "leaf_counted_twice", "counts", "mean_of_means", "non_finite"}
)


@dataclass(frozen=True)
class AnalyticsFinding:
    """One failed check; ``field`` / ``column`` / ``leaf`` say where."""

    check: str
    message: str
    field: str | None = None
    column: str | None = None
    leaf: str | None = None
    expected: Any = None
    got: Any = None
    tolerance: float | None = None


@dataclass
class AnalyticsJudgement:
    """The verdict; ``pooled`` holds each column's reference statistics (for reports)."""

    checks: int = 0
    findings: list[AnalyticsFinding] = field(default_factory=list)
    pooled: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.findings

    @property
    def forensics(self) -> list[AnalyticsFinding]:
        """The findings that explain others: a leaf dropped or doubled, pooled statistics,
        a NaN in a sum."""
        return [f for f in self.findings if f.check in FORENSIC_CHECKS]

    def summary(self) -> str:
        if self.passed:
            return f"analytics: {self.checks} checks passed"
        lines = [f"analytics: {len(self.findings)} of {self.checks} checks failed"]
        ordered = self.forensics + [f for f in self.findings if f.check not in FORENSIC_CHECKS]
        lines += [f"  - {f.message}" for f in ordered[:20]]
        if len(self.findings) > 20:
            lines.append(f"  ... and {len(self.findings) - 20} more")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": self.checks,
            "findings": [_jsonable(asdict(f)) for f in self.findings],
            "pooled": _jsonable(self.pooled),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class _Column:
    """A column pooled from per-site reductions."""

    n: int = 0
    nan: int = 0
    sums: list[float] = field(default_factory=list)
    sumsqs: list[float] = field(default_factory=list)
    abs_sum: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    max_rows: int = 0
    site_n: list[int] = field(default_factory=list)
    site_nan: list[int] = field(default_factory=list)
    site_mean: list[float] = field(default_factory=list)
    site_m2: list[float] = field(default_factory=list)

    def add(self, raw: np.ndarray) -> None:
        x = raw if raw.dtype == np.float64 else raw.astype(np.float64)
        mask = np.isnan(x)
        nan = int(np.count_nonzero(mask))
        if nan:
            x = x[~mask]
        n = int(x.size)
        s = float(x.sum())
        ss = float(np.dot(x, x))
        self.n += n
        self.nan += nan
        self.sums.append(s)
        self.sumsqs.append(ss)
        self.abs_sum += float(np.abs(x).sum())
        self.max_rows = max(self.max_rows, int(raw.size))
        self.site_n.append(n)
        self.site_nan.append(nan)
        if n:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            mean = s / n
            d = x - mean
            self.site_mean.append(mean)
            self.site_m2.append(float(np.dot(d, d)))
        else:
            self.site_mean.append(math.nan)
            self.site_m2.append(0.0)

    # -- the reference
    @property
    def total(self) -> float:
        return math.fsum(self.sums)

    @property
    def total_sq(self) -> float:
        return math.fsum(self.sumsqs)

    def variance(self) -> float:
        """Pooled population variance by Chan's formula (no per-site statistics pooled)."""
        mean = self.total / self.n
        m2 = math.fsum(self.site_m2) + math.fsum(
            n * (m - mean) ** 2 for n, m in zip(self.site_n, self.site_mean, strict=True) if n
        )
        return m2 / self.n

    def tol_sum(self, sites: int) -> float:
        return (self.max_rows + sites + 2) * U * self.abs_sum

    def tol_sumsq(self, sites: int) -> float:
        return (self.max_rows + sites + 3) * U * self.total_sq


def _scalar(arr: Any) -> float:
    a = np.asarray(arr).reshape(-1)
    return float(a[0]) if a.size else math.nan


class _Judge:
    def __init__(self, aggregate: Mapping[str, np.ndarray]) -> None:
        self.agg = aggregate
        self.out = AnalyticsJudgement()

    def fail(self, check: str, message: str, **where: Any) -> None:
        self.out.findings.append(AnalyticsFinding(check, message, **where))

    def got(self, name: str, column: str | None = None) -> np.ndarray | None:
        self.out.checks += 1
        if name not in self.agg:
            self.fail(
                "field_missing",
                f"field {name!r} is missing from the aggregate",
                field=name,
                column=column,
            )
            return None
        return np.asarray(self.agg[name])

    def exact(self, name: str, expected: Any, column: str | None = None) -> None:
        got = self.got(name, column)
        if got is None:
            return
        exp = np.asarray(expected)
        if got.shape != exp.shape or not np.array_equal(got, exp):
            self.fail(
                "exact",
                f"field {name!r} is {got.tolist()}, expected exactly {exp.tolist()}",
                field=name,
                column=column,
                expected=exp,
                got=got,
            )

    def close(self, name: str, expected: float, tol: float, column: str | None = None) -> None:
        got_arr = self.got(name, column)
        if got_arr is None:
            return
        got = _scalar(got_arr)
        if not math.isfinite(got):
            self.fail(
                "non_finite",
                f"field {name!r} is {got} (expected {expected!r}): a "
                "NaN or infinity reached the combined value",
                field=name,
                column=column,
                expected=expected,
                got=got,
                tolerance=tol,
            )
        elif abs(got - expected) > tol:
            self.fail(
                "tolerance",
                f"field {name!r} is {got!r}, expected {expected!r} "
                f"(off by {abs(got - expected):.3g}, tolerance {tol:.3g})",
                field=name,
                column=column,
                expected=expected,
                got=got,
                tolerance=tol,
            )


def judge_analytics(
    sites: Iterable[tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    aggregate: Mapping[str, np.ndarray],
    *,
    field_ops: Mapping[str, str] | None = None,
    derived: Mapping[str, Mapping[str, Any]] | None = None,
) -> AnalyticsJudgement:
    """Judge one FA round.

    ``sites``: ``(leaf label, raw columns, custom fields)`` of every upload the platform
    recorded in the round, consumed once (raw columns are reduced and dropped);
    ``aggregate``: the downloaded aggregate archive's arrays; ``field_ops``: the operation
    of every custom field; ``derived``: the round record's derived statistics, if the
    platform reports them.
    """
    ops = dict(field_ops or {})
    columns: dict[str, _Column] = {}
    custom: dict[str, list[np.ndarray]] = {}
    labels: list[str] = []
    for label, raw_columns, fields in sites:
        labels.append(label)
        for name, raw in raw_columns.items():
            columns.setdefault(name, _Column()).add(np.asarray(raw))
        for name, value in fields.items():
            custom.setdefault(name, []).append(np.asarray(value))
    j = _Judge(aggregate)
    nsites = len(labels)
    _check_layout(j, columns, custom)
    for name, col in columns.items():
        _check_column(j, name, col, nsites)
        j.out.pooled[name] = _pooled_summary(col)
    for name, values in custom.items():
        _check_custom(j, name, ops.get(name), values, labels)
    if derived is not None:
        for name, col in columns.items():
            _check_derived(j, name, col, derived.get(name), nsites)
    _attribute_leaves(j, columns, custom, ops, labels)
    return j.out


def _check_layout(
    j: _Judge, columns: Mapping[str, _Column], custom: Mapping[str, list[np.ndarray]]
) -> None:
    expected = {f"{c}_{s}" for c in columns for s in SUFFIXES} | set(custom)
    j.out.checks += 1
    kind = j.agg.get(KIND_KEY)
    if kind is None or str(np.asarray(kind)) != "federated_analytics":
        j.fail(
            "kind",
            f"the aggregate declares kind {None if kind is None else str(kind)!r}, "
            "expected 'federated_analytics'",
        )
    j.out.checks += 1
    extra = sorted(set(j.agg) - expected - {KIND_KEY})
    if extra:
        j.fail(
            "unexpected_field",
            f"the aggregate holds fields no site sent: {', '.join(extra)}",
            field=extra[0],
        )


def _pooled_summary(col: _Column) -> dict[str, Any]:
    mean = col.total / col.n if col.n else math.nan
    var = col.variance() if col.n else math.nan
    return {
        "count": col.n,
        "nan": col.nan,
        "sum": col.total,
        "min": col.lo,
        "max": col.hi,
        "mean": mean,
        "variance": var,
        "std": math.sqrt(var) if var == var else math.nan,
        "sites": len(col.site_n),
    }


def _check_column(j: _Judge, name: str, col: _Column, nsites: int) -> None:
    j.exact(f"{name}_n", np.array([col.n], np.int64), name)
    j.exact(f"{name}_nan", np.array([col.nan], np.int64), name)
    if col.n:
        j.exact(f"{name}_min", np.array([col.lo]), name)
        j.exact(f"{name}_max", np.array([col.hi]), name)
    j.close(f"{name}_sum", col.total, col.tol_sum(nsites), name)
    j.close(f"{name}_sumsq", col.total_sq, col.tol_sumsq(nsites), name)
    _mean_of_means(j, name, col)


def _mean_of_means(j: _Judge, name: str, col: _Column) -> None:
    """Say so when a wrong ``_sum`` is n x the mean of the per-site means."""
    bad = [f for f in j.out.findings if f.field == f"{name}_sum" and f.check == "tolerance"]
    means = [m for m, n in zip(col.site_mean, col.site_n, strict=True) if n]
    if not bad or not means or col.n == 0:
        return
    pooled = col.n * math.fsum(means) / len(means)
    got = float(bad[0].got)
    if abs(got - pooled) <= max(col.tol_sum(len(means)), 1e-9 * abs(pooled)):
        j.fail(
            "mean_of_means",
            f"column {name!r}: the combined sum {got!r} is n x the mean of "
            f"the {len(means)} per-site means; site statistics were pooled instead of sums "
            f"(the pooled sum is {col.total!r})",
            field=f"{name}_sum",
            column=name,
            expected=col.total,
            got=got,
        )


def _check_custom(
    j: _Judge, name: str, op: str | None, values: list[np.ndarray], labels: list[str]
) -> None:
    if op is None:
        j.out.checks += 1
        j.fail("field_ops", f"custom field {name!r} has no operation in field_ops", field=name)
        return
    first = values[0]
    if op == "must_match":
        for label, v in zip(labels, values, strict=True):
            if not np.array_equal(v, first):
                j.out.checks += 1
                j.fail(
                    "sites_disagree",
                    f"must_match field {name!r}: leaf {label} sent "
                    f"{v.tolist()}, others {first.tolist()}",
                    field=name,
                    leaf=label,
                )
                return
        j.exact(name, first)
    elif op in ("min", "max"):
        reduce = np.minimum if op == "min" else np.maximum
        acc = first
        for v in values[1:]:
            acc = reduce(acc, v)
        j.exact(name, acc)
    elif first.dtype.kind in "biu":
        total = [
            sum(int(x) for x in col)
            for col in zip(*(v.reshape(-1).tolist() for v in values), strict=True)
        ]
        dtype = np.int64 if first.dtype.kind in "bi" else np.uint64
        j.exact(name, np.array(total, dtype=dtype).reshape(first.shape))
    else:
        stack = np.stack([v.astype(np.float64) for v in values])
        got = j.got(name)
        if got is None:
            return
        ref = np.array([math.fsum(c) for c in stack.reshape(len(values), -1).T])
        tol = (len(values) + 2) * U * np.abs(stack).sum(axis=0).reshape(-1)
        diff = np.abs(got.astype(np.float64).reshape(-1) - ref)
        if got.size != ref.size or not np.all(diff <= tol):
            j.fail(
                "tolerance",
                f"field {name!r} is {got.tolist()}, expected {ref.tolist()}",
                field=name,
                expected=ref,
                got=got,
            )


def _check_derived(
    j: _Judge, name: str, col: _Column, stats: Mapping[str, Any] | None, nsites: int
) -> None:
    j.out.checks += 1
    if stats is None:
        j.fail(
            "derived_missing",
            f"the round record has no derived statistics for {name!r}",
            column=name,
        )
        return
    n = col.n
    if n == 0:
        return
    mean = col.total / n
    var = col.variance()
    std = math.sqrt(var)
    tol_sum = col.tol_sum(nsites)
    tol_mean = tol_sum / n + 2 * U * abs(mean)
    tol_var = (
        col.tol_sumsq(nsites) / n
        + (2 * abs(mean) + tol_mean) * tol_mean
        + 4 * U * (col.total_sq / n + mean * mean)
    )
    tol_std = min(math.sqrt(tol_var), tol_var / std) if std > 0 else math.sqrt(tol_var)
    expected: dict[str, tuple[float, float]] = {
        "count": (n, 0.0),
        "nan": (col.nan, 0.0),
        "sum": (col.total, tol_sum),
        "min": (col.lo, 0.0),
        "max": (col.hi, 0.0),
        "range": (col.hi - col.lo, 2 * U * abs(col.hi - col.lo)),
        "mean": (mean, tol_mean),
        "variance": (var, tol_var),
        "std": (std, tol_std),
        "completeness": (n / (n + col.nan), 2 * U),
    }
    for stat, (ref, tol) in expected.items():
        j.out.checks += 1
        got = stats.get(stat)
        if not isinstance(got, (int, float)) or isinstance(got, bool) or not math.isfinite(got):
            j.fail(
                "derived",
                f"derived {stat} of column {name!r} is {got!r}, expected {ref!r}",
                column=name,
                field=f"{name}:{stat}",
                expected=ref,
                got=got,
                tolerance=tol,
            )
        elif abs(got - ref) > tol:
            j.fail(
                "derived",
                f"derived {stat} of column {name!r} is {got!r}, expected {ref!r} "
                f"(off by {abs(got - ref):.3g}, tolerance {tol:.3g})",
                column=name,
                field=f"{name}:{stat}",
                expected=ref,
                got=got,
                tolerance=tol,
            )


def _attribute_leaves(
    j: _Judge,
    columns: Mapping[str, _Column],
    custom: Mapping[str, list[np.ndarray]],
    ops: Mapping[str, str],
    labels: list[str],
) -> None:
    """Name the leaf whose counts the aggregate is missing, or holds twice."""
    if not j.out.findings or not labels:
        return
    names: list[str] = []
    per_site: list[list[int]] = [[] for _ in labels]
    for col_name, col in columns.items():
        for suffix, counts in (("n", col.site_n), ("nan", col.site_nan)):
            names.append(f"{col_name}_{suffix}")
            for i, c in enumerate(counts):
                per_site[i].append(c)
    for name, values in custom.items():
        if ops.get(name) == "sum" and values[0].dtype.kind in "biu":
            names.append(name)
            for i, v in enumerate(values):
                per_site[i].append(int(v.astype(np.int64).sum()))
    got: list[int] = []
    for name in names:
        if name not in j.agg:
            return
        got.append(int(np.asarray(j.agg[name]).astype(np.int64).sum()))
    expected = [sum(col) for col in zip(*per_site, strict=True)]
    diff = [g - e for g, e in zip(got, expected, strict=True)]
    if not any(diff):
        return
    changed = [n for n, d in zip(names, diff, strict=True) if d]
    dropped = [lab for lab, v in zip(labels, per_site, strict=True) if [-x for x in v] == diff]
    doubled = [lab for lab, v in zip(labels, per_site, strict=True) if v == diff]
    if len(dropped) == 1:
        j.fail(
            "leaf_missing",
            f"leaf {dropped[0]}'s upload is missing from the aggregate: "
            f"every summed count ({len(changed)} fields, e.g. {changed[0]!r}) is short by "
            "exactly that leaf's values",
            leaf=dropped[0],
            field=changed[0],
        )
    elif len(doubled) == 1:
        j.fail(
            "leaf_counted_twice",
            f"leaf {doubled[0]}'s upload is counted twice: every summed "
            f"count ({len(changed)} fields, e.g. {changed[0]!r}) exceeds the pooled value by "
            "exactly that leaf's values",
            leaf=doubled[0],
            field=changed[0],
        )
    else:
        j.fail(
            "counts",
            f"summed counts differ in {len(changed)} fields (e.g. {changed[0]!r}); "
            "no single leaf's values explain the difference",
            field=changed[0],
        )


@dataclass(frozen=True)
class ColumnHistogram:
    """Counts of one column over shared bins: pooled and per site (NaNs left out)."""

    edges: list[float]
    pooled: list[int]
    sites: dict[str, list[int]]

    def to_json(self) -> dict[str, Any]:
        return {"edges": self.edges, "pooled": self.pooled, "sites": self.sites}


def column_histograms(
    sites: Iterable[tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    pooled: Mapping[str, Mapping[str, Any]],
    *,
    bins: int = 30,
) -> dict[str, ColumnHistogram]:
    """Each column's pooled and per-site histograms, for a report's distribution plot.

    A second pass over the regenerated ``sites`` (same shape as ``judge_analytics``
    takes), with bins spanning the judge's pooled min and max (``verdict.pooled``), so
    memory stays one site at a time. Integer columns get unit-aligned bins when their
    range is small, bool columns two.
    """
    edges: dict[str, np.ndarray] = {}
    for name, stats in pooled.items():
        lo, hi = float(stats["min"]), float(stats["max"])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        if lo.is_integer() and hi.is_integer() and hi - lo < bins:
            edges[name] = np.arange(lo - 0.5, hi + 1.0, 1.0)
        else:
            edges[name] = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    pooled_counts = {name: np.zeros(len(e) - 1, np.int64) for name, e in edges.items()}
    per_site: dict[str, dict[str, list[int]]] = {name: {} for name in edges}
    for label, columns, _ in sites:
        for name, raw in columns.items():
            if name not in edges:
                continue
            x = np.asarray(raw, dtype=np.float64)
            counts = np.histogram(x[~np.isnan(x)], edges[name])[0]
            pooled_counts[name] += counts
            per_site[name][label] = counts.tolist()
    return {
        name: ColumnHistogram(e.tolist(), pooled_counts[name].tolist(), per_site[name])
        for name, e in edges.items()
    }
