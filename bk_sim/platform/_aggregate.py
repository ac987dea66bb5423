"""Aggregation strategies of the reference platform (PROTOCOL.md section 7).

Strategies, per layer and per coordinate:

- ``fedavg``: sum(w_i * x_i) / sum(w_i), with w_i the upload's weighting;
- ``mean``: the unweighted mean;
- ``median``: the coordinate-wise median (unweighted; mean of the two middle values for
  an even count);
- ``trimmed_mean``: drop the floor(trim_fraction * N) lowest and highest values of each
  coordinate, then the unweighted mean of the rest.

Memory. ``fedavg`` and ``mean`` stream: uploads are added in order, in batches of up to
``BATCH_UPLOADS`` (16, at most ``BATCH_BYTES`` = 64 MiB of them) into float64
accumulators, while the next ``READ_AHEAD`` (4) are decoded ahead by ``READ_THREADS``
helper threads (cores - 1) and by the caller's thread whenever it would otherwise wait
(inflate releases the GIL, so decoding overlaps adding and uses every core).
Peak memory is the accumulators (8 bytes a parameter), one batch and the read-ahead,
whatever N is.
``median`` and ``trimmed_mean`` need all N values of a coordinate at once: every upload is
decoded once into an N x layer scratch matrix (in memory up to ``IN_MEMORY_SCRATCH_BYTES``,
otherwise a memory-mapped file under ``SCRATCH_DIR``, removed afterwards), then reduced in
blocks of coordinates, so the working memory is N x block x 8 bytes (about
``BLOCK_BYTES``), not N x model.

Dtypes. Uploads must agree on each layer's dtype; the aggregate is stored in that dtype.
Everything is computed in float64. Float layers: the float64 result is cast to the dtype.
Integer and bool layers: the float64 result is rounded half to even (``np.rint``) only at
the end, clipped to the dtype's range, then cast (a mean of 1 and 2 in int8 is 2, of 2 and
3 is 2; a bool layer is a majority vote with ties going to False). int64 / uint64 values
beyond 2**53 lose precision in float64.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bk_sim.errors import AggregationError, WeightsFormatError
from bk_sim.weights import read_weights_fast

__all__ = [
    "AGGREGATION_BUGS",
    "STRATEGIES",
    "Upload",
    "aggregate",
    "apply_bug",
    "streaming_average",
]

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("fedavg", "mean", "median", "trimmed_mean")
AGGREGATION_BUGS: tuple[str, ...] = ("unweighted", "drop_leaf", "double_count")

#: Scratch matrices for median / trimmed_mean up to this size stay in memory.
IN_MEMORY_SCRATCH_BYTES = 64 * 2**20
#: Where larger scratch matrices are memory-mapped (None: the system temp folder).
SCRATCH_DIR: Path | None = None
#: Target size of one N x block float64 working block for median / trimmed_mean.
BLOCK_BYTES = 8 * 2**20
#: FedAvg / mean add up to this many uploads at once (held by reference, no copies)...
BATCH_UPLOADS = 16
#: ...as long as they hold no more than this many bytes.
BATCH_BYTES = 64 * 2**20
#: The float64 staging block (batch x coordinates) of a batch; meant to stay in L2.
STAGING_BYTES = 2**20
#: Helper threads decoding uploads ahead (inflate releases the GIL); the caller's thread
#: decodes too whenever it would otherwise wait, so together they use every core...
READ_THREADS = max(1, min(3, (os.cpu_count() or 2) - 1))
#: ...and how many uploads may be decoded ahead, so adding a batch never stalls them.
READ_AHEAD = 4


@dataclass(frozen=True)
class Upload:
    """One leaf's stored upload in a round, with the weighting the round recorded."""

    leaf_id: str
    path: Path
    weighting: float


# --------------------------------------------------------------------------- public


def aggregate(
    uploads: Sequence[Upload],
    strategy: str = "fedavg",
    *,
    trim_fraction: float = 0.1,
    max_decompressed_bytes: int | None = None,
) -> list[np.ndarray]:
    """Layers of the aggregate, each in the uploads' dtype.

    Raises ``AggregationError`` for no uploads, an unknown strategy, a trim fraction
    outside [0, 0.5), an unreadable upload, a weighting that is not finite and > 0
    (fedavg), or uploads that disagree on layer count, shapes or dtypes.
    """
    _check_strategy(strategy)
    if not 0.0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    if len(uploads) == 0:
        raise AggregationError("no uploads to aggregate")
    weighted = strategy == "fedavg"
    if weighted:
        for up in uploads:
            if not (math.isfinite(up.weighting) and up.weighting > 0):
                raise AggregationError(
                    f"leaf {up.leaf_id}: weighting must be finite and > 0, got {up.weighting!r}"
                )
    log.debug("aggregating %d uploads with %s", len(uploads), strategy)
    # Weightings divided by a power of two near the largest: the sums cannot overflow
    # (two weightings of 1e308 made the total inf and the aggregate NaN), and dividing
    # by a power of two is exact, so the result is bit for bit the unscaled one.
    shift = math.frexp(max(up.weighting for up in uploads))[1] if weighted else 0
    with contextlib.closing(_decoded(uploads, max_decompressed_bytes)) as stream:
        if strategy in ("fedavg", "mean"):
            acc = _Accumulator(weighted=weighted, expected=len(uploads))
            for up, layers in stream:
                acc.add(up.leaf_id, math.ldexp(up.weighting, -shift), layers)
            return acc.result()
        return _order_statistic(stream, len(uploads), strategy, trim_fraction)


def streaming_average(
    items: Iterable[tuple[float, Sequence[np.ndarray]]], *, weighted: bool = True
) -> list[np.ndarray]:
    """FedAvg (or the unweighted mean) of ``(weighting, layers)`` pairs taken one at a time.

    The pure numeric core of ``aggregate``: arrays in, arrays out, memory independent of
    how many pairs ``items`` yields. Up to ``BATCH_UPLOADS`` pairs are held by reference
    and added together, so do not modify an array after handing it over. Leaves are named
    by position in error messages.
    """
    acc = _Accumulator(weighted=weighted)
    for i, (weighting, layers) in enumerate(items):
        w = float(weighting)
        if weighted and not (math.isfinite(w) and w > 0):
            raise AggregationError(f"upload {i}: weighting must be finite and > 0, got {w!r}")
        acc.add(f"#{i}", w, layers)
    if acc.count == 0:
        raise AggregationError("no uploads to aggregate")
    return acc.result()


def apply_bug(uploads: Sequence[Upload], strategy: str, bug: str) -> tuple[list[Upload], str, str]:
    """A deliberately wrong aggregation for the harness's self-test.

    Returns (uploads to aggregate, strategy to use, victim leaf_id): ``unweighted`` keeps the
    uploads and switches to ``mean`` (victim "", everyone); ``drop_leaf`` leaves out the
    upload with the largest weighting (ties: smallest leaf_id); ``double_count`` lists that
    same upload twice (right after itself). Deterministic.
    """
    _check_strategy(strategy)
    if bug not in AGGREGATION_BUGS:
        raise AggregationError(
            f"unknown aggregation bug {bug!r}; expected one of {', '.join(AGGREGATION_BUGS)}"
        )
    if len(uploads) == 0:
        raise AggregationError("no uploads to aggregate")
    if bug == "unweighted":
        return list(uploads), "mean", ""
    victim = min(range(len(uploads)), key=lambda i: (-uploads[i].weighting, uploads[i].leaf_id))
    before, chosen, after = uploads[:victim], uploads[victim], uploads[victim + 1 :]
    if bug == "drop_leaf":
        return [*before, *after], strategy, chosen.leaf_id
    return [*before, chosen, chosen, *after], strategy, chosen.leaf_id


# --------------------------------------------------------------------------- helpers


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise AggregationError(
            f"unknown aggregation strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )


def _read(up: Upload, max_decompressed_bytes: int | None) -> list[np.ndarray]:
    try:
        _, layers = read_weights_fast(up.path, max_decompressed_bytes=max_decompressed_bytes)
    except WeightsFormatError as exc:
        raise AggregationError(f"leaf {up.leaf_id}: {exc}") from exc
    return layers


class _Pending:
    """An upload in the read-ahead window: its decode job, or its layers once decoded."""

    __slots__ = ("future", "layers", "upload")

    def __init__(self, upload: Upload, future: Future[list[np.ndarray]]) -> None:
        self.upload = upload
        self.future = future
        self.layers: list[np.ndarray] | None = None


def _decoded(
    uploads: Sequence[Upload], max_decompressed_bytes: int | None
) -> Generator[tuple[Upload, list[np.ndarray]], None, None]:
    """Each upload with its layers, in order, decoded ahead by ``READ_THREADS`` helpers.

    Inflate and numpy release the GIL, so decoding overlaps adding. When the next upload
    is not decoded yet, the caller's thread decodes a queued one itself instead of waiting
    (it takes the job back from the pool), so every core decodes and no more threads are
    busy than cores. At most ``READ_AHEAD`` decoded uploads wait besides the one the caller
    holds, whatever N is; the order of the sums stays the order of ``uploads``.
    """
    if len(uploads) == 1 or READ_THREADS < 1:
        for up in uploads:
            yield up, _read(up, max_decompressed_bytes)
        return
    threads = min(READ_THREADS, len(uploads))
    ahead_max = max(threads + 1, READ_AHEAD)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bk-aggregate-read") as pool:
        window: deque[_Pending] = deque()
        todo = iter(uploads)
        try:
            while True:
                for up in itertools.islice(todo, ahead_max - len(window)):
                    window.append(_Pending(up, pool.submit(_read, up, max_decompressed_bytes)))
                if not window:
                    return
                head = window[0]
                while head.layers is None:
                    if not head.future.done():
                        stolen = next(
                            (q for q in window if q.layers is None and q.future.cancel()), None
                        )
                        if stolen is not None:
                            stolen.layers = _read(stolen.upload, max_decompressed_bytes)
                            continue
                    head.layers = head.future.result()
                window.popleft()
                up, layers = head.upload, head.layers
                del head
                yield up, layers
                del layers
        finally:
            for q in window:
                q.future.cancel()


def _native(dtype: np.dtype) -> np.dtype:
    """``dtype`` in native byte order, so '<f4' and '>f4' uploads agree."""
    return dtype.newbyteorder("=")


class _Layout:
    """The layer count, shapes and dtypes of the first upload; later ones must match."""

    def __init__(self, leaf_id: str, layers: Sequence[np.ndarray]) -> None:
        self.leaf_id = leaf_id
        self.shapes = [tuple(x.shape) for x in layers]
        self.dtypes = [_native(x.dtype) for x in layers]

    def check(self, leaf_id: str, layers: Sequence[np.ndarray]) -> None:
        if len(layers) != len(self.shapes):
            raise AggregationError(
                f"leaf {leaf_id}: {len(layers)} layers, but leaf {self.leaf_id} has "
                f"{len(self.shapes)}"
            )
        for i, (x, shape, dtype) in enumerate(zip(layers, self.shapes, self.dtypes, strict=True)):
            if tuple(x.shape) != shape:
                raise AggregationError(
                    f"leaf {leaf_id}, layer_{i}: shape {tuple(x.shape)} differs from "
                    f"leaf {self.leaf_id}'s {shape}"
                )
            if _native(x.dtype) != dtype:
                raise AggregationError(
                    f"leaf {leaf_id}, layer_{i}: dtype {_native(x.dtype)} differs from "
                    f"leaf {self.leaf_id}'s {dtype}"
                )


class _Accumulator:
    """Running float64 sums of w_i * x_i (or x_i) per layer.

    Uploads are added in batches of up to ``BATCH_UPLOADS`` (held by reference, at most
    ``BATCH_BYTES`` of them): for each block of coordinates the batch's values are cast into
    a float64 staging matrix small enough to stay in cache and reduced with one
    ``np.einsum("k,kn->n")``; the accumulator is read and written once per batch, not once
    per upload. Measured here: about 1.4x ``np.multiply(x, w, out=tmp, dtype=float64)`` +
    ``np.add(acc, tmp, out=acc)`` per upload, itself about 4x ``acc += w * x`` (which,
    under NEP 50, also computes w * x in float32). Not ``np.dot``: OpenBLAS threads it and
    its idle threads spin, taking the core a decoding thread needs (measured: CPU time up
    to 2x wall time on this 2-core machine).
    """

    def __init__(self, *, weighted: bool, expected: int | None = None) -> None:
        """``expected``: how many uploads will come, when known. Batches are then at most a
        quarter of them, so that adding overlaps decoding even for small rounds."""
        self._weighted = weighted
        self._expected = expected
        self._layout: _Layout | None = None
        self._acc: list[np.ndarray] = []
        self._pending: list[tuple[float, list[np.ndarray]]] = []
        self._batch = 1
        self._staging = np.empty((0, 0))
        self._part = np.empty(0)
        self._filled = False
        self._total = 0.0
        self.count = 0

    def add(self, leaf_id: str, weighting: float, layers: Sequence[np.ndarray]) -> None:
        """Take one upload's layers; they are read (never written) until ``result``."""
        layers = [np.asarray(x) for x in layers]
        if self._layout is None:
            if len(layers) == 0:
                raise AggregationError(f"leaf {leaf_id}: no layers")
            self._layout = _Layout(leaf_id, layers)
            self._allocate(layers)
        else:
            self._layout.check(leaf_id, layers)
        w = float(weighting) if self._weighted else 1.0
        self._pending.append((w, [x.reshape(-1) for x in layers]))
        self._total += w
        self.count += 1
        if len(self._pending) >= self._batch:
            self._flush()

    def _allocate(self, layers: Sequence[np.ndarray]) -> None:
        # One np.empty buffer for all layers: np.zeros would be fresh calloc pages, faulted
        # in on first touch (~0.4 ms per MB here; the first batch writes the sums instead),
        # and numpy asks for huge pages at >= 4 MB.
        sizes = [x.size for x in layers]
        ends = np.cumsum(sizes).tolist()
        buffer = np.empty(ends[-1], dtype=np.float64)
        self._acc = [buffer[end - size : end] for size, end in zip(sizes, ends, strict=True)]
        upload_bytes = max(1, sum(x.nbytes for x in layers))
        self._batch = max(1, min(BATCH_UPLOADS, BATCH_BYTES // upload_bytes))
        if self._expected is not None:
            self._batch = max(1, min(self._batch, math.ceil(self._expected / 4)))
        cols = max(256, STAGING_BYTES // (8 * self._batch))
        self._staging = np.empty((self._batch, cols), dtype=np.float64)
        self._part = np.empty(cols, dtype=np.float64)

    def _flush(self) -> None:
        if not self._pending:
            return
        k = len(self._pending)
        weights = np.array([w for w, _ in self._pending], dtype=np.float64)
        cols = self._staging.shape[1]
        for j, acc in enumerate(self._acc):
            for lo in range(0, acc.size, cols):
                hi = min(lo + cols, acc.size)
                block = self._staging[:k, : hi - lo]
                for row, (_, flats) in enumerate(self._pending):
                    block[row] = flats[j][lo:hi]  # cast to float64, in cache
                if self._filled:
                    part = self._part[: hi - lo]
                    np.einsum("k,kn->n", weights, block, out=part)
                    np.add(acc[lo:hi], part, out=acc[lo:hi])
                else:
                    np.einsum("k,kn->n", weights, block, out=acc[lo:hi])
        self._filled = True
        self._pending.clear()

    def result(self) -> list[np.ndarray]:
        self._flush()
        layout = self._layout
        assert layout is not None
        out = []
        for acc, shape, dtype in zip(self._acc, layout.shapes, layout.dtypes, strict=True):
            if dtype.kind == "f":  # divide in float64 and cast in the same pass
                result = np.empty(acc.shape, dtype=dtype)
                np.divide(acc, self._total, out=result, casting="same_kind")
            else:
                np.divide(acc, self._total, out=acc)
                result = _to_dtype(acc, dtype)
            out.append(result.reshape(shape))
        self._acc = []
        return out


def _order_statistic(
    stream: Iterable[tuple[Upload, list[np.ndarray]]],
    n: int,
    strategy: str,
    trim_fraction: float,
) -> list[np.ndarray]:
    """Median or trimmed mean: gather each layer into N x size scratch, reduce in blocks."""
    trim = math.floor(trim_fraction * n) if strategy == "trimmed_mean" else 0
    with tempfile.TemporaryDirectory(prefix="bk-aggregate-", dir=SCRATCH_DIR) as scratch:
        layout: _Layout | None = None
        matrices: list[np.ndarray] = []
        for row, (up, layers) in enumerate(stream):
            if layout is None:
                layout = _Layout(up.leaf_id, layers)
                matrices = _scratch_matrices(n, layers, Path(scratch))
            else:
                layout.check(up.leaf_id, layers)
            for m, x in zip(matrices, layers, strict=True):
                m[row] = x.reshape(-1)
        assert layout is not None
        out = []
        for shape, dtype in zip(layout.shapes, layout.dtypes, strict=True):
            m = matrices.pop(0)  # drop each scratch matrix (and its mapping) once reduced
            out.append(_to_dtype(_reduce_blocks(m, strategy, trim), dtype).reshape(shape))
            del m
        return out


def _scratch_matrices(n: int, layers: Sequence[np.ndarray], folder: Path) -> list[np.ndarray]:
    """One N x size matrix per layer, in the layer's dtype: in memory or memory-mapped."""
    total = n * sum(x.nbytes for x in layers)
    in_memory = total <= IN_MEMORY_SCRATCH_BYTES
    out: list[np.ndarray] = []
    for i, x in enumerate(layers):
        dtype = _native(x.dtype)
        if in_memory or x.size == 0:
            out.append(np.empty((n, x.size), dtype=dtype))
        else:
            path = folder / f"layer_{i}.bin"
            out.append(np.memmap(path, dtype=dtype, mode="w+", shape=(n, x.size)))
    where = "in memory" if in_memory else f"memory-mapped in {folder}"
    log.debug("scratch for %d uploads: %d bytes %s", n, total, where)
    return out


def _reduce_blocks(m: np.ndarray, strategy: str, trim: int) -> np.ndarray:
    """Median / trimmed mean over axis 0 of ``m``, BLOCK_BYTES of float64 at a time."""
    n, size = m.shape
    result = np.empty(size, dtype=np.float64)
    block = max(1, BLOCK_BYTES // (8 * n))
    for lo in range(0, size, block):
        hi = min(lo + block, size)
        values = m[:, lo:hi].astype(np.float64)
        if strategy == "median":
            result[lo:hi] = np.median(values, axis=0)
        else:
            values.sort(axis=0)
            result[lo:hi] = values[trim : n - trim].mean(axis=0)
    return result


def _int_bounds(dtype: np.dtype) -> tuple[float, float]:
    """The dtype's range as float64 values that cast back without overflow."""
    if dtype.kind == "b":
        return 0.0, 1.0
    info = np.iinfo(dtype)
    lo, hi = float(info.min), float(info.max)
    if int(hi) > info.max:  # int64 / uint64: the max rounds up to 2**63 / 2**64
        hi = float(np.nextafter(hi, -np.inf))
    return lo, hi


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The float64 result in the layers' dtype (may overwrite ``values``)."""
    if dtype.kind == "f":
        return values.astype(dtype)
    np.rint(values, out=values)
    lo, hi = _int_bounds(dtype)
    np.clip(values, lo, hi, out=values)
    return values.astype(dtype)
