"""FedAvg / mean judged a chunk at a time: memory of a few chunks, not N models (issue 17).

``compare_chunked`` takes each contribution as per-layer iterators of flat chunks (the
validator regenerates uploads with ``bk_sim.synth.leaf_update_chunks``) and the
platform's aggregate, and for every block of coordinates adds the contributions' chunks
into a float64 block (in contribution order, as ``reference_aggregate`` does), divides,
and judges the block with the same per-value rule as ``compare``. Only the verdict and the
largest errors are kept. A failed layer's reason names the block's worst value; callers
that want the full diagnosis (forensics) re-run the whole-model path on failure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from bk_sim.errors import AggregationError
from bk_sim.validate._compare import (
    Comparison,
    LayerComparison,
    _compare_layer,
    tolerance_for,
)

__all__ = ["compare_chunked"]


def compare_chunked(
    contributions: Sequence[tuple[float, Sequence[Iterator[np.ndarray]]]],
    actual: Sequence[np.ndarray],
    *,
    weighted: bool,
    expected_dtypes: Sequence[np.dtype],
    rtol: float | None,
    atol: float | None,
) -> Comparison:
    """The verdict of ``compare(reference_aggregate(...), actual)``, streaming."""
    if not contributions:
        raise AggregationError("no contributions to aggregate")
    weights = []
    total = 0.0
    for index, (w, _) in enumerate(contributions):
        w = float(w) if weighted else 1.0
        if not (math.isfinite(w) and w > 0):
            raise AggregationError(
                f"contribution {index}: weighting must be finite and > 0, got {w!r}"
            )
        weights.append(w)
        total += w
    if len(actual) != len(expected_dtypes):
        n_ref = len(expected_dtypes)
        why = f"the aggregate has {len(actual)} layers, the reference has {n_ref}"
        return Comparison(False, math.inf, math.inf, (), why)
    layers: list[LayerComparison] = []
    reason: str | None = None
    for i, (act, dtype) in enumerate(zip(actual, expected_dtypes, strict=True)):
        layer = _layer(i, [c[i] for _, c in contributions], weights, total, act, dtype, rtol, atol)
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


def _layer(
    index: int,
    chunks: Sequence[Iterator[np.ndarray]],
    weights: Sequence[float],
    total: float,
    act: np.ndarray,
    expected: np.dtype,
    rtol: float | None,
    atol: float | None,
) -> LayerComparison:
    flat = np.asarray(act).reshape(-1)
    shape = tuple(np.asarray(act).shape)
    dtype = np.asarray(act).dtype.newbyteorder("=")
    max_abs = max_rel = 0.0
    mismatched = 0
    first_reason: str | None = None
    l_rtol = l_atol = 0.0
    lo = 0
    acc = np.empty(0, dtype=np.float64)
    tmp = np.empty(0, dtype=np.float64)
    while True:
        pieces = [next(it, None) for it in chunks]
        if pieces[0] is None:
            if any(p is not None for p in pieces):
                raise AggregationError(f"layer_{index}: contributions differ in size")
            break
        n = pieces[0].size
        if acc.size < n:
            acc, tmp = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64)
        a, t = acc[:n], tmp[:n]
        a[...] = 0.0
        for w, p in zip(weights, pieces, strict=True):
            if p is None or p.size != n:
                raise AggregationError(f"layer_{index}: contributions differ in size")
            np.multiply(p, w, out=t, dtype=np.float64)
            np.add(a, t, out=a)
        np.divide(a, total, out=a)
        if lo + n > flat.size:
            return LayerComparison(
                index, shape, str(dtype), math.inf, math.inf, False,
                f"{flat.size} values, the reference has more",
            )  # fmt: skip
        act_chunk = flat[lo : lo + n]
        quick = _quick_float(a, act_chunk, dtype, expected, rtol, atol, t)
        if quick is not None:  # every value within tolerance: only the maxima are needed
            l_rtol, l_atol, chunk_abs, chunk_rel = quick
            max_abs, max_rel = max(max_abs, chunk_abs), max(max_rel, chunk_rel)
            lo += n
            continue
        verdict = _compare_layer(index, a, act_chunk, expected, rtol, atol)
        l_rtol, l_atol = verdict.rtol, verdict.atol
        max_abs = max(max_abs, verdict.max_abs_error)
        max_rel = max(max_rel, verdict.max_rel_error)
        mismatched += verdict.mismatched
        if not verdict.passed and first_reason is None:
            first_reason = f"{verdict.reason} (in the block starting at flat index {lo})"
        lo += n
    if lo != flat.size:
        first_reason = first_reason or f"{flat.size} values, the reference has {lo}"
        max_abs = max_rel = math.inf
    return LayerComparison(
        index=index,
        shape=shape,
        dtype=str(dtype),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        passed=first_reason is None,
        reason=first_reason,
        mismatched=mismatched,
        rtol=l_rtol,
        atol=l_atol,
    )


def _quick_float(
    ref: np.ndarray,
    act: np.ndarray,
    dtype: np.dtype,
    expected: np.dtype,
    rtol: float | None,
    atol: float | None,
    scratch: np.ndarray,
) -> tuple[float, float, float, float] | None:
    """(rtol, atol, max abs, max rel) of a float block that passes ``compare``'s rule
    (the same formulas, fewer temporaries); None: not a float block, or a value fails,
    so ``_compare_layer`` says which and why."""
    if expected.kind != "f" or dtype != expected:
        return None
    l_rtol, l_atol = tolerance_for(expected, rtol, atol)
    err = np.subtract(act, ref, out=scratch, dtype=np.float64)
    np.abs(err, out=err)
    scale = np.abs(ref)
    allowed = scale * l_rtol
    allowed += l_atol
    with np.errstate(invalid="ignore"):
        if not bool(np.all(err <= allowed)):  # NaN compares False: the slow path says so
            return None
        np.maximum(scale, max(l_atol, 1e-30), out=scale)
        max_abs = float(err.max(initial=0.0))
        np.divide(err, scale, out=err)
        max_rel = float(err.max(initial=0.0))
    return l_rtol, l_atol, max_abs, max_rel
