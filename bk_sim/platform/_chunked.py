"""The platform's aggregation with memory bounded by one model (issue 17).

``aggregate_to_file`` computes the same aggregate as ``aggregate`` (same strategies,
same float64 arithmetic, same dtype rules) without ever holding a decoded upload: each
stored upload is read member by member in ``CHUNK_BYTES`` pieces
(``_zipstream.iter_chunks``) by one reader thread, while the caller's thread adds the
pieces into float64 accumulators (inflate and CRC release the GIL, so reading and adding
use both cores). The result is divided in place and cast into the first half of the
accumulator's own memory, then written chunk by chunk with ``NpzWriter``.

Peak memory for float32 layers: the accumulators (8 bytes a parameter, 2 x S, S being
one decoded upload) plus a few chunks, whatever the number of uploads. ``median`` and
``trimmed_mean`` write every upload into an N x model scratch file (on disk, not mapped)
and reduce it in blocks of coordinates read back with ``pread``: their memory is the
result (8 bytes a parameter) plus N x block.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bk_sim.errors import AggregationError, WeightsFormatError
from bk_sim.npzstream import NpzMember as Member
from bk_sim.npzstream import NpzWriter
from bk_sim.platform._aggregate import (
    BLOCK_BYTES,
    SCRATCH_DIR,
    Upload,
    _check_strategy,
    _int_bounds,
)
from bk_sim.platform._zipstream import iter_chunks, read_members

__all__ = ["aggregate_to_file"]

log = logging.getLogger(__name__)

#: Decoded chunks waiting between the reader thread and the adder.
QUEUE_CHUNKS = 4
#: Float64 elements cast / written per step when finishing.
_OUT_CHUNK = 2**20


@dataclass(frozen=True)
class _Layer:
    shape: tuple[int, ...]
    dtype: np.dtype
    size: int


def _layout(up: Upload, max_decompressed: int | None) -> tuple[list[_Layer], list[Member]]:
    where = f"leaf {up.leaf_id}"
    try:
        with open(up.path, "rb") as f:
            members = {m.key: m for m in read_members(f, where, max_decompressed)}
    except OSError as exc:
        raise AggregationError(f"{where}: cannot read the stored upload: {exc}") from exc
    except WeightsFormatError as exc:
        raise AggregationError(str(exc)) from exc
    keys = sorted((k for k in members if k.startswith("layer_")), key=lambda k: int(k[6:]))
    if not keys:
        raise AggregationError(f"{where}: no layers")
    layers = [members[k] for k in keys]
    return [_Layer(m.shape, m.dtype.newbyteorder("="), math.prod(m.shape)) for m in layers], layers


def _check(first: str, want: list[_Layer], leaf: str, got: list[_Layer]) -> None:
    if len(got) != len(want):
        raise AggregationError(f"leaf {leaf}: {len(got)} layers, but leaf {first} has {len(want)}")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            raise AggregationError(
                f"leaf {leaf}, layer_{i}: shape {g.shape} differs from leaf {first}'s {w.shape}"
            )
        if g.dtype != w.dtype:
            raise AggregationError(
                f"leaf {leaf}, layer_{i}: dtype {g.dtype} differs from leaf {first}'s {w.dtype}"
            )


def _member_values(f: object, m: Member, where: str) -> Iterator[np.ndarray]:
    """A member's values in C order, in chunks (a Fortran-order member is read whole)."""
    chunks = iter_chunks(f, m, where)  # type: ignore[arg-type]
    if not m.fortran or len(m.shape) < 2:
        yield from chunks
        return
    whole = np.concatenate(list(chunks)) if m.size else np.empty(0, m.dtype)
    yield whole.reshape(m.shape, order="F").reshape(-1)


_DONE = object()


def _chunks_in_order(
    uploads: Sequence[Upload], members: Sequence[list[Member]]
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """(upload index, layer index, offset, values) for every upload, read by one thread."""
    q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for u, (up, layers) in enumerate(zip(uploads, members, strict=True)):
                where = f"leaf {up.leaf_id}"
                with open(up.path, "rb") as f:
                    for j, m in enumerate(layers):
                        lo = 0
                        for values in _member_values(f, m, where):
                            if not put((u, j, lo, values)):
                                return
                            lo += values.size
            put(_DONE)
        except (OSError, WeightsFormatError) as exc:
            put(exc)

    thread = threading.Thread(target=reader, name="bk-aggregate-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, WeightsFormatError):
                raise AggregationError(str(item)) from item
            if isinstance(item, OSError):
                raise AggregationError(f"cannot read a stored upload: {item}") from item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def aggregate_to_file(
    uploads: Sequence[Upload],
    strategy: str,
    target: Path,
    *,
    trim_fraction: float = 0.1,
    max_decompressed_bytes: int | None = None,
) -> int:
    """Aggregate ``uploads`` into the archive ``target`` (atomically); return its size."""
    _check_strategy(strategy)
    if not 0.0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    if not uploads:
        raise AggregationError("no uploads to aggregate")
    weighted = strategy == "fedavg"
    if weighted:
        for up in uploads:
            if not (math.isfinite(up.weighting) and up.weighting > 0):
                raise AggregationError(
                    f"leaf {up.leaf_id}: weighting must be finite and > 0, got {up.weighting!r}"
                )
    layout: list[_Layer] = []
    members: list[list[Member]] = []
    for up in uploads:  # every layout first: a mismatch fails before any work
        lay, mem = _layout(up, max_decompressed_bytes)
        if not layout:
            layout = lay
        else:
            _check(uploads[0].leaf_id, layout, up.leaf_id, lay)
        members.append(mem)
    shift = math.frexp(max(up.weighting for up in uploads))[1] if weighted else 0
    if strategy in ("fedavg", "mean"):
        weights = [math.ldexp(up.weighting, -shift) if weighted else 1.0 for up in uploads]
        acc = _sum(uploads, members, layout, weights)
        total = math.fsum(weights)
        results = _finish(acc, layout, total)
    else:
        trim = math.floor(trim_fraction * len(uploads)) if strategy == "trimmed_mean" else 0
        results = _order_statistic(uploads, members, layout, strategy, trim)
    part = target.with_name(f".{target.name}.part")
    try:
        with NpzWriter(part, "fast") as w:
            for i, (layer, values) in enumerate(zip(layout, results, strict=True)):
                w.add(f"layer_{i}", layer.dtype, layer.shape, _slices(values))
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return target.stat().st_size


def _slices(values: np.ndarray) -> Iterator[np.ndarray]:
    for lo in range(0, values.size, _OUT_CHUNK):
        yield values[lo : lo + _OUT_CHUNK]


def _sum(
    uploads: Sequence[Upload],
    members: Sequence[list[Member]],
    layout: Sequence[_Layer],
    weights: Sequence[float],
) -> list[np.ndarray]:
    """Float64 sums of w_i * x_i per layer (flat), one chunk at a time."""
    sizes = [layer.size for layer in layout]
    ends = np.cumsum(sizes).tolist()
    buffer = np.zeros(int(ends[-1]) if ends else 0, dtype=np.float64)
    acc = [buffer[end - size : end] for size, end in zip(sizes, ends, strict=True)]
    tmp = np.empty(0, dtype=np.float64)
    for u, j, lo, values in _chunks_in_order(uploads, members):
        n = values.size
        if tmp.size < n:
            tmp = np.empty(n, dtype=np.float64)
        t = tmp[:n]
        w = weights[u]
        if w == 1.0:
            t[...] = values
        else:
            np.multiply(values, w, out=t, dtype=np.float64)
        a = acc[j][lo : lo + n]
        np.add(a, t, out=a)
    return acc


def _finish(acc: list[np.ndarray], layout: Sequence[_Layer], total: float) -> list[np.ndarray]:
    """Divide each layer by ``total`` and cast it in place (into its own first bytes)."""
    out: list[np.ndarray] = []
    tmp = np.empty(_OUT_CHUNK, dtype=np.float64)
    for a, layer in zip(acc, layout, strict=True):
        dtype = layer.dtype
        if dtype.itemsize > 8 or a.size == 0:
            np.divide(a, total, out=a)
            out.append(_cast(a, dtype))
            continue
        # The cast layer lives in the first dtype.itemsize / 8 of the layer's float64
        # buffer. Element k is written at byte k * itemsize and read from byte 8 * k,
        # so copying each chunk out before writing it never overwrites unread values.
        dest = a.view(np.uint8)[: a.size * dtype.itemsize].view(dtype)
        for lo in range(0, a.size, _OUT_CHUNK):
            hi = min(lo + _OUT_CHUNK, a.size)
            t = tmp[: hi - lo]
            np.divide(a[lo:hi], total, out=t)
            dest[lo:hi] = _cast(t, dtype)
        out.append(dest)
    return out


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float64 values in ``dtype``: floats cast, ints / bools rounded half to even, clipped."""
    if dtype.kind == "f":
        return values.astype(dtype)
    np.rint(values, out=values)
    lo, hi = _int_bounds(dtype)
    np.clip(values, lo, hi, out=values)
    return values.astype(dtype)


def _order_statistic(
    uploads: Sequence[Upload],
    members: Sequence[list[Member]],
    layout: Sequence[_Layer],
    strategy: str,
    trim: int,
) -> list[np.ndarray]:
    """Median / trimmed mean through an N x layer scratch file read back in blocks."""
    n = len(uploads)
    with tempfile.TemporaryDirectory(prefix="bk-aggregate-", dir=SCRATCH_DIR) as scratch:
        fds = [
            os.open(Path(scratch) / f"layer_{j}.bin", os.O_RDWR | os.O_CREAT, 0o600)
            for j in range(len(layout))
        ]
        try:
            for u, j, lo, values in _chunks_in_order(uploads, members):
                row = u * layout[j].size
                data = np.ascontiguousarray(values, dtype=layout[j].dtype)
                os.pwrite(fds[j], data.view(np.uint8).data, (row + lo) * data.itemsize)
            out = []
            for fd, layer in zip(fds, layout, strict=True):
                result = np.empty(layer.size, dtype=np.float64)
                block = max(1, BLOCK_BYTES // (8 * n))
                item = layer.dtype.itemsize
                for lo in range(0, layer.size, block):
                    hi = min(lo + block, layer.size)
                    values = np.empty((n, hi - lo), dtype=np.float64)
                    for r in range(n):
                        raw = os.pread(fd, (hi - lo) * item, (r * layer.size + lo) * item)
                        values[r] = np.frombuffer(raw, dtype=layer.dtype)
                    if strategy == "median":
                        result[lo:hi] = np.median(values, axis=0)
                    else:
                        values.sort(axis=0)
                        result[lo:hi] = values[trim : n - trim].mean(axis=0)
                out.append(_cast(result, layer.dtype))
            return out
        finally:
            for fd in fds:
                os.close(fd)
