"""Judge a returned aggregate against the float64 reference, layer by layer.

Tolerances (``tolerance_for``), derived from how a correct platform computes: accumulate
in float64, then cast once to the uploads' dtype (PROTOCOL.md section 7).

- Float layers. The cast rounds to nearest, an error of at most half an ulp, and an ulp is
  at most ``eps * |x|``; a platform summing in another order moves its float64 value by
  ~N * 1e-16 relative, which can flip that rounding by one more ulp at most. So
  ``rtol = eps(dtype)`` (float16 9.8e-4, float32 1.2e-7) bounds a correct result with 2x
  margin, and a 1e-3 error on float32 fails by four orders of magnitude. ``atol`` covers
  values near zero, where cancellation in float64 (~1e-13 absolute) dominates: 1e-12 for
  float32/float64, the smallest subnormal step (6e-8) for float16. Float64 layers get
  ``rtol = 1e-10``: summation order alone can differ there.
- Integer layers. The platform rounds half to even at the end (``np.rint``) and clips to
  the dtype's range, so the expected value is exact: the check is equality with the
  rounded reference, except that a value whose reference lies within 1e-6 of a .5 tie may
  be off by 1 (a different float64 summation order can land on either side of the tie).
  ``tolerance_for`` reports that bound as ``(0.0, 1.0)``. Explicit ``rtol``/``atol``
  replace the rule with ``|actual - rint(reference)| <= atol + rtol * |reference|``.

A value passes when ``|actual - reference| <= atol + rtol * |reference|`` (numpy's
``isclose`` form, relative to the reference). NaN or infinity in the aggregate fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Distance from a .5 tie within which an integer layer may be off by one.
INT_TIE_WINDOW = 1e-6

_FLOAT_TOLERANCE: dict[str, tuple[float, float]] = {
    "float16": (float(np.finfo(np.float16).eps), float(np.finfo(np.float16).smallest_subnormal)),
    "float32": (float(np.finfo(np.float32).eps), 1e-12),
    "float64": (1e-10, 1e-12),
}


def tolerance_for(dtype: np.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """(rtol, atol) for a layer of ``dtype``; an explicit value replaces the derived one."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        d_rtol, d_atol = _FLOAT_TOLERANCE.get(
            dt.name, (float(np.finfo(dt).eps), float(np.finfo(dt).smallest_subnormal))
        )
    elif dt.kind in "iub":
        d_rtol, d_atol = 0.0, 1.0
    else:
        raise ValueError(f"no tolerance for non-numeric dtype {dt}")
    return (d_rtol if rtol is None else float(rtol), d_atol if atol is None else float(atol))


@dataclass(frozen=True)
class LayerComparison:
    """One layer's verdict. Errors are against the reference (ints: the rounded one)."""

    index: int
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    passed: bool
    reason: str | None = None
    mismatched: int = 0
    rtol: float = 0.0
    atol: float = 0.0


@dataclass(frozen=True)
class Comparison:
    """The verdict on a whole aggregate; ``reason`` says in words what failed first."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    layers: tuple[LayerComparison, ...]
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: infinities and NaN become None, shapes become lists."""
        safe: dict[str, Any] = _json_safe(asdict(self))
        return safe


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def compare(
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    *,
    rtol: float | None,
    atol: float | None,
    expected_dtypes: Sequence[np.dtype] | None = None,
) -> Comparison:
    """Compare ``actual`` (the platform's aggregate) with the float64 ``reference``.

    The expected dtype of each layer is ``expected_dtypes``, else ``reference.dtypes``
    (a ``ReferenceAggregate``), else the reference's own dtype when it is not float64;
    otherwise dtypes are not checked and ``actual``'s dtype picks the tolerance.
    """
    if expected_dtypes is None:
        expected_dtypes = getattr(reference, "dtypes", None) or None
    layers: list[LayerComparison] = []
    reason: str | None = None
    if len(reference) != len(actual):
        reason = f"the aggregate has {len(actual)} layers, the reference has {len(reference)}"
    for i, (ref, act) in enumerate(zip(reference, actual, strict=False)):
        expected = None
        if expected_dtypes is not None and i < len(expected_dtypes):
            expected = np.dtype(expected_dtypes[i])
        elif np.asarray(ref).dtype != np.float64:
            expected = np.asarray(ref).dtype
        layer = _compare_layer(i, np.asarray(ref), np.asarray(act), expected, rtol, atol)
        layers.append(layer)
        if reason is None and not layer.passed:
            reason = f"layer_{i}: {layer.reason}"
    return Comparison(
        passed=reason is None,
        max_abs_error=max((x.max_abs_error for x in layers), default=0.0),
        max_rel_error=max((x.max_rel_error for x in layers), default=0.0),
        layers=tuple(layers),
        reason=reason,
    )


def _compare_layer(
    index: int,
    ref: np.ndarray,
    act: np.ndarray,
    expected: np.dtype | None,
    rtol: float | None,
    atol: float | None,
) -> LayerComparison:
    shape = tuple(act.shape)
    dtype = act.dtype.newbyteorder("=")
    if tuple(ref.shape) != shape:
        return LayerComparison(
            index, shape, str(dtype), math.inf, math.inf, False,
            f"shape {shape} differs from the reference's {tuple(ref.shape)}",
        )  # fmt: skip
    if dtype.kind not in "biuf":
        return LayerComparison(
            index, shape, str(dtype), math.inf, math.inf, False,
            f"dtype {dtype} is not numeric",
        )  # fmt: skip
    judge = expected if expected is not None else dtype
    l_rtol, l_atol = tolerance_for(judge, rtol, atol)
    a = act.astype(np.float64, copy=False).reshape(-1)
    r = ref.astype(np.float64, copy=False).reshape(-1)
    explicit = rtol is not None or atol is not None
    if judge.kind in "iub":
        target = np.rint(r)
        if judge.kind != "b":
            info = np.iinfo(judge)
            np.clip(target, float(info.min), float(info.max), out=target)
        err = np.abs(a - target)
        if explicit:
            allowed = l_atol + l_rtol * np.abs(r)
        else:
            near_tie = np.abs(np.abs(r - np.floor(r)) - 0.5) <= INT_TIE_WINDOW
            allowed = np.where(near_tie, 1.0, 0.0)
        scale = np.abs(target)
    else:
        err = np.abs(a - r)
        allowed = l_atol + l_rtol * np.abs(r)
        scale = np.abs(r)
    bad_values = ~np.isfinite(a)
    over = (err > allowed) | bad_values
    mismatched = int(np.count_nonzero(over))
    with np.errstate(invalid="ignore"):
        max_abs = float(np.max(err, initial=0.0)) if not bad_values.any() else math.inf
        rel = err / np.maximum(scale, max(l_atol, 1e-30))
        max_rel = float(np.max(rel, initial=0.0)) if not bad_values.any() else math.inf
    reasons = []
    if expected is not None and dtype != expected:
        reasons.append(f"dtype {dtype} differs from the uploads' {expected}")
    if bad_values.any():
        reasons.append(f"{int(np.count_nonzero(bad_values))} values are NaN or infinite")
    if mismatched and not bad_values.all():
        worst = int(np.argmax(np.where(bad_values, -np.inf, err - allowed)))
        coord = tuple(int(c) for c in np.unravel_index(worst, shape)) if shape else ()
        reasons.append(
            f"{mismatched:,} of {a.size:,} values differ by more than "
            f"{_tol_text(judge, l_rtol, l_atol, explicit)}; worst at {list(coord)}: "
            f"{float(a[worst]):.9g} vs reference {float(r[worst]):.9g} (error {err[worst]:.3g})"
        )
    return LayerComparison(
        index=index,
        shape=shape,
        dtype=str(dtype),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        passed=not reasons,
        reason="; ".join(reasons) or None,
        mismatched=mismatched,
        rtol=l_rtol,
        atol=l_atol,
    )


def _tol_text(judge: np.dtype, rtol: float, atol: float, explicit: bool) -> str:
    if judge.kind in "iub" and not explicit:
        return "the rounding rule (exact, or 1 at a .5 tie)"
    return f"atol {atol:.3g} + rtol {rtol:.3g} x |reference|"
