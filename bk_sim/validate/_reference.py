"""The reference aggregate: what a correct platform must return, computed in float64.

Written from PROTOCOL.md section 7, independently of ``bk_sim.platform`` (a reference
that shared the platform's code would share its bugs):

- ``fedavg``: sum(w_i * x_i) / sum(w_i); ``mean``: the unweighted mean. Both stream: one
  contribution at a time into float64 accumulators, so memory does not grow with N.
- ``median``: the coordinate-wise median (mean of the two middle values for even N);
  ``trimmed_mean``: drop floor(trim_fraction * N) values at each end of every coordinate,
  then the unweighted mean. Both need all N values of a coordinate, so they keep the
  contributions (in their own dtype) and reduce in float64 blocks.

The result stays float64 (no cast to the uploads' dtype: ``compare`` judges the platform's
cast); the uploads' dtypes ride along on ``ReferenceAggregate.dtypes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from bk_sim.errors import AggregationError

STRATEGIES: tuple[str, ...] = ("fedavg", "mean", "median", "trimmed_mean")

#: Elements per step of the streaming add: the float64 product stays in cache.
_CHUNK = 1 << 15
#: Float64 bytes per block when reducing median / trimmed mean.
_BLOCK_BYTES = 8 << 20


class ReferenceAggregate(list[np.ndarray]):
    """A list of float64 layers that also knows the uploads' dtypes (``dtypes``)."""

    dtypes: tuple[np.dtype, ...] = ()


def reference_aggregate(
    contributions: Iterable[tuple[float, Sequence[np.ndarray]]],
    strategy: str,
    trim_fraction: float = 0.1,
) -> ReferenceAggregate:
    """Float64 layers of the correct aggregate of ``(weighting, layers)`` pairs.

    Raises ``AggregationError`` for an unknown strategy, no contributions, a weighting that
    is not finite and > 0 (fedavg), or contributions that disagree on layers.
    """
    if strategy not in STRATEGIES:
        raise AggregationError(
            f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    if not 0.0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    if strategy in ("fedavg", "mean"):
        return _streaming(contributions, weighted=strategy == "fedavg")
    return _order_statistic(contributions, strategy, trim_fraction)


def _layout_of(layers: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], np.dtype]]:
    return [(tuple(x.shape), x.dtype.newbyteorder("=")) for x in layers]


def _check_layout(
    index: int, layers: Sequence[np.ndarray], layout: list[tuple[tuple[int, ...], np.dtype]]
) -> None:
    if len(layers) != len(layout):
        raise AggregationError(
            f"contribution {index} has {len(layers)} layers, the first has {len(layout)}"
        )
    for i, (x, (shape, dtype)) in enumerate(zip(layers, layout, strict=True)):
        if tuple(x.shape) != shape or x.dtype.newbyteorder("=") != dtype:
            raise AggregationError(
                f"contribution {index}, layer_{i}: {x.dtype} {tuple(x.shape)} differs from the "
                f"first contribution's {dtype} {shape}"
            )


def _streaming(
    contributions: Iterable[tuple[float, Sequence[np.ndarray]]], *, weighted: bool
) -> ReferenceAggregate:
    layout: list[tuple[tuple[int, ...], np.dtype]] | None = None
    acc: list[np.ndarray] = []
    tmp = np.empty(_CHUNK, dtype=np.float64)
    total = 0.0
    for index, (weighting, raw_layers) in enumerate(contributions):
        layers = [np.asarray(x) for x in raw_layers]
        w = float(weighting)
        if weighted and not (math.isfinite(w) and w > 0):
            raise AggregationError(
                f"contribution {index}: weighting must be finite and > 0, got {w!r}"
            )
        if layout is None:
            if not layers:
                raise AggregationError(f"contribution {index} has no layers")
            layout = _layout_of(layers)
            acc = [np.zeros(x.size, dtype=np.float64) for x in layers]
        else:
            _check_layout(index, layers, layout)
        for a, x in zip(acc, layers, strict=True):
            flat = x.reshape(-1)
            if not weighted:
                np.add(a, flat, out=a, dtype=np.float64)
                continue
            for lo in range(0, flat.size, _CHUNK):
                hi = min(lo + _CHUNK, flat.size)
                t = tmp[: hi - lo]
                np.multiply(flat[lo:hi], w, out=t, dtype=np.float64)
                np.add(a[lo:hi], t, out=a[lo:hi])
        total += w if weighted else 1.0
    if layout is None:
        raise AggregationError("no contributions to aggregate")
    out = ReferenceAggregate()
    for a, (shape, _) in zip(acc, layout, strict=True):
        np.divide(a, total, out=a)
        out.append(a.reshape(shape))
    out.dtypes = tuple(d for _, d in layout)
    return out


def _order_statistic(
    contributions: Iterable[tuple[float, Sequence[np.ndarray]]],
    strategy: str,
    trim_fraction: float,
) -> ReferenceAggregate:
    kept: list[list[np.ndarray]] = []
    layout: list[tuple[tuple[int, ...], np.dtype]] | None = None
    for index, (_, raw_layers) in enumerate(contributions):
        layers = [np.asarray(x) for x in raw_layers]
        if layout is None:
            if not layers:
                raise AggregationError(f"contribution {index} has no layers")
            layout = _layout_of(layers)
        else:
            _check_layout(index, layers, layout)
        kept.append(layers)
    if layout is None:
        raise AggregationError("no contributions to aggregate")
    n = len(kept)
    trim = math.floor(trim_fraction * n) if strategy == "trimmed_mean" else 0
    out = ReferenceAggregate()
    for i, (shape, _) in enumerate(layout):
        stacked = np.stack([c[i].reshape(-1) for c in kept])  # n x size, uploads' dtype
        result = np.empty(stacked.shape[1], dtype=np.float64)
        block = max(1, _BLOCK_BYTES // (8 * n))
        for lo in range(0, stacked.shape[1], block):
            values = stacked[:, lo : lo + block].astype(np.float64)
            if strategy == "median":
                result[lo : lo + block] = np.median(values, axis=0)
            else:
                values.sort(axis=0)
                result[lo : lo + block] = values[trim : n - trim].mean(axis=0)
        out.append(result.reshape(shape))
    out.dtypes = tuple(d for _, d in layout)
    return out
