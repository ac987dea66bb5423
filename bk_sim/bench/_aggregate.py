"""``bk-sim bench aggregate``: how fast the platform aggregates, and against what.

Two measurements from one run, side by side:

1. The aggregation step alone, on decoded arrays: our streaming FedAvg (arrays handed over
   one upload at a time, float64 accumulators) against the form most frameworks use (all N
   clients' arrays in memory, each multiplied by its weight, ``functools.reduce(np.add)``,
   divided by the total). The arrays an approach must hold before it starts (one upload for
   a stream, all N for the naive form) are listed apart.
2. End to end, stored ``.npz`` uploads to the stored aggregate (``aggregate`` +
   ``save_layers``), beside the time to only decode the same files with the same reader
   (the floor), on one thread and on as many threads as ``aggregate`` reads with.

Times are the best of ``repeat`` runs, interleaved so that load from other processes hits
every approach alike. Peak memory comes from one more run under ``tracemalloc`` (numpy
and Python buffers report to it; threads included): what the measured call allocates at
its peak, beyond what existed before it.

Uploads are built from a pool of at most 8 distinct random models (generating 1,000
distinct 4 MB models would dominate the run); every upload is its own file.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from bk_sim import platform as _aggregate  # its READ_THREADS: what the platform uses
from bk_sim.errors import PlatformError
from bk_sim.platform import Upload, aggregate, streaming_average
from bk_sim.weights import (
    Compression,
    encode_weights,
    read_weights,
    read_weights_fast,
    save_layers,
)

_POOL = 8
_MiB = 2**20
#: Share of available memory the naive form may plan to use before it is skipped.
_NAIVE_MEMORY_SHARE = 0.85
#: Targets from the issue.
STEP_SPEEDUP_TARGET = 5.0
END_TO_END_TARGET = 1.25

Layers = list[np.ndarray]


@dataclass(frozen=True)
class StepResult:
    """The aggregation step for N uploads: ours and the naive form, cold and warm.

    Cold: the freed memory was handed back to the OS first (``malloc_trim``), so new
    buffers are fresh pages, as in a process's first round. Warm: the allocator reuses the
    previous run's memory.
    """

    n: int
    model_bytes: int
    ours_cold_s: float
    ours_warm_s: float
    ours_peak: int
    naive_cold_s: float | None
    naive_warm_s: float | None
    naive_peak: int | None
    naive_skipped: str
    max_diff: float | None

    @property
    def speedup_cold(self) -> float | None:
        return None if self.naive_cold_s is None else self.naive_cold_s / self.ours_cold_s

    @property
    def speedup_warm(self) -> float | None:
        return None if self.naive_warm_s is None else self.naive_warm_s / self.ours_warm_s


@dataclass(frozen=True)
class EndToEndResult:
    """Stored uploads to stored aggregate for N uploads, beside decode-only floors."""

    n: int
    upload_bytes: int
    decode_s: float
    decode_parallel_s: float
    decode_zlib_s: float
    e2e_s: float
    e2e_peak: int

    @property
    def ratio(self) -> float:
        """End to end over the decode floor with the same threads ``aggregate`` uses."""
        return self.e2e_s / self.decode_parallel_s


# --------------------------------------------------------------------------- data


def _pool(params: int, layers: int, data: str, k: int, seed: int = 0) -> list[Layers]:
    """k distinct float32 models of ``params`` values split into ``layers`` layers."""
    rng = np.random.default_rng(seed)
    sizes = [params // layers] * layers
    sizes[-1] += params - sum(sizes)
    out = []
    for _ in range(k):
        model = [(rng.standard_normal(s, dtype=np.float32) * np.float32(0.05)) for s in sizes]
        if data == "rounded":  # "trained-like": fewer distinct values, compresses ~2x
            model = [np.round(x, 3) for x in model]
        out.append(model)
    return out


def _weights(n: int) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.float64) % 97 + 1.0


def _naive_fedavg(clients: Sequence[tuple[float, Layers]]) -> Layers:
    """The common form: every client's weighted layers in memory, reduce(np.add), divide."""
    total = sum(w for w, _ in clients)
    weighted = [[layer * w for layer in layers] for w, layers in clients]
    by_layer = zip(*weighted, strict=True)
    return [functools.reduce(np.add, layer_updates) / total for layer_updates in by_layer]


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next buffers are fresh pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def _best_of(
    repeat: int, fns: Sequence[Callable[[], object]], *, cold: bool = False
) -> list[float]:
    """The best time of each function over ``repeat`` rounds, the functions interleaved."""
    best = [math.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if cold:
                _release_memory()
            else:
                gc.collect()
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _traced_peak(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of ``fn`` (numpy buffers included), beyond the start."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- step


def measure_step(
    pool: Sequence[Layers], n: int, *, repeat: int = 1, force_naive: bool = False
) -> StepResult:
    """Ours (streamed from the pool, no copies) against the naive form (N distinct copies)."""
    weights = _weights(n)
    model_bytes = sum(x.nbytes for x in pool[0])

    def stream() -> Iterator[tuple[float, Layers]]:
        return ((float(weights[i]), pool[i % len(pool)]) for i in range(n))

    ours = streaming_average(stream())
    ours_peak = _traced_peak(lambda: streaming_average(stream()))
    need = 2 * n * model_bytes + 64 * _MiB
    available = psutil.virtual_memory().available
    if need > _NAIVE_MEMORY_SHARE * available and not force_naive:
        reason = (
            f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available "
            "(--force-naive runs it anyway)"
        )
        ours_fn = [lambda: streaming_average(stream())]
        (ours_cold,) = _best_of(repeat, ours_fn, cold=True)
        (ours_warm,) = _best_of(repeat, ours_fn)
        return StepResult(
            n, model_bytes, ours_cold, ours_warm, ours_peak, None, None, None, reason, None
        )
    clients = [(float(weights[i]), [x.copy() for x in pool[i % len(pool)]]) for i in range(n)]
    naive = _naive_fedavg(clients)
    naive_peak = _traced_peak(lambda: _naive_fedavg(clients))
    fns = [lambda: streaming_average(stream()), lambda: _naive_fedavg(clients)]
    ours_cold, naive_cold = _best_of(repeat, fns, cold=True)
    ours_warm, naive_warm = _best_of(repeat, fns)
    diff = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(ours, naive, strict=True))
    return StepResult(
        n,
        model_bytes,
        ours_cold,
        ours_warm,
        ours_peak,
        naive_cold,
        naive_warm,
        naive_peak,
        "",
        diff,
    )


# --------------------------------------------------------------------------- end to end


def _write_uploads(
    folder: Path, pool: Sequence[Layers], n: int, compression: Compression
) -> list[Upload]:
    """N upload files, upload i holding pool model i % len(pool) (encoded once per model)."""
    archives = [
        encode_weights(float(k + 1), model, compression=compression) for k, model in enumerate(pool)
    ]
    uploads = []
    for i in range(n):
        path = folder / f"upload_{i:05d}.npz"
        path.write_bytes(archives[i % len(pool)])
        uploads.append(Upload(f"leaf{i:05d}", path, float(i % len(pool) + 1)))
    return uploads


def measure_end_to_end(
    uploads: Sequence[Upload], out: Path, compression: Compression, *, repeat: int = 1
) -> EndToEndResult:
    """Decode-only floors (ISA-L on 1 thread and on as many as ``aggregate`` uses; zlib)
    beside the real thing: aggregate + store."""
    paths = [u.path for u in uploads]

    def decode(reader: Callable[[Path], object]) -> None:
        for p in paths:
            reader(p)

    def decode_parallel() -> None:
        with ThreadPoolExecutor(max_workers=_aggregate.READ_THREADS + 1) as pool:
            for _ in pool.map(read_weights_fast, paths):
                pass

    def end_to_end() -> None:
        save_layers(out, aggregate(uploads, "fedavg"), compression=compression)

    decode_s, decode_parallel_s, e2e_s = _best_of(
        repeat, [lambda: decode(read_weights_fast), decode_parallel, end_to_end]
    )
    (decode_zlib_s,) = _best_of(1, [lambda: decode(read_weights)])  # context: once is enough
    e2e_peak = _traced_peak(end_to_end)
    return EndToEndResult(
        n=len(uploads),
        upload_bytes=sum(p.stat().st_size for p in paths),
        decode_s=decode_s,
        decode_parallel_s=decode_parallel_s,
        decode_zlib_s=decode_zlib_s,
        e2e_s=e2e_s,
        e2e_peak=e2e_peak,
    )


# --------------------------------------------------------------------------- report


def _machine() -> str:
    vm = psutil.virtual_memory()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{vm.total / 2**30:.1f} GiB RAM ({vm.available / 2**30:.1f} GiB available), "
        f"load average {load}; Python {sys.version.split()[0]}, numpy {np.__version__}"
    )


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / _MiB:,.1f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def _verdict(name: str, speedups: Sequence[float | None]) -> str:
    got = [x for x in speedups if x is not None]
    if not got:
        return f"{name} NOT MEASURED"
    return (
        f"{name} "
        + ("MET" if min(got) >= STEP_SPEEDUP_TARGET else "NOT MET")
        + (f" (min {min(got):.1f}x)")
    )


def _ratio(a: float | None, b: float | None, fmt: str = "{:.1f}x") -> str:
    return "-" if a is None or b is None else fmt.format(a / b)


def render_step(results: Sequence[StepResult]) -> list[str]:
    rows = []
    for r in results:
        gb = r.n * r.model_bytes / 1e9
        rows.append(
            [
                f"{r.n:,}",
                _s(r.ours_cold_s),
                _s(r.ours_warm_s),
                f"{gb / r.ours_warm_s:.2f}",
                _mib(r.ours_peak),
                _mib(r.model_bytes),
                _s(r.naive_cold_s),
                _s(r.naive_warm_s),
                "-" if r.naive_warm_s is None else f"{gb / r.naive_warm_s:.2f}",
                _mib(r.naive_peak),
                _mib(r.n * r.model_bytes),
                _ratio(r.naive_cold_s, r.ours_cold_s),
                _ratio(r.naive_warm_s, r.ours_warm_s),
                _ratio(r.naive_peak, r.ours_peak, "{:.0f}x"),
                "-" if r.max_diff is None else f"{r.max_diff:.1e}",
            ]
        )
    lines = _table(
        [
            "N",
            "ours cold s",
            "warm s",
            "GB/s",
            "peak MiB",
            "held MiB",
            "naive cold s",
            "warm s",
            "GB/s",
            "peak MiB",
            "held MiB",
            "speedup cold",
            "warm",
            "mem ratio",
            "max|diff|",
        ],
        rows,
    )
    lines += [f"  N={r.n:,}: naive {r.naive_skipped}" for r in results if r.naive_skipped]
    peaks = [r.ours_peak for r in results]
    flat = max(peaks) <= min(peaks) * 1.1 + _MiB
    lines.append(
        f"target: >= {STEP_SPEEDUP_TARGET:g}x faster than naive: "
        + _verdict("cold", [r.speedup_cold for r in results])
        + ", "
        + _verdict("warm", [r.speedup_warm for r in results])
        + "; peak memory flat in N: "
        + ("MET" if flat else "NOT MET")
        + f" ({_mib(min(peaks))} to {_mib(max(peaks))} MiB)"
    )
    return lines


def render_end_to_end(results: Sequence[EndToEndResult]) -> list[str]:
    rows = [
        [
            f"{r.n:,}",
            f"{r.upload_bytes / 1e6:,.0f}",
            _s(r.decode_s),
            _s(r.decode_parallel_s),
            _s(r.decode_zlib_s),
            _s(r.e2e_s),
            f"{r.upload_bytes / 1e6 / r.e2e_s:,.0f}",
            f"{r.ratio:.2f}x",
            f"{r.e2e_s / r.decode_s:.2f}x",
            _mib(r.e2e_peak),
        ]
        for r in results
    ]
    k = _aggregate.READ_THREADS + 1
    lines = _table(
        [
            "N",
            "upload MB",
            "decode 1thr s",
            f"decode {k}thr s",
            "decode zlib s",
            "e2e s",
            "MB/s",
            f"e2e/{k}thr",
            "e2e/1thr",
            "peak MiB",
        ],
        rows,
    )
    worst = max(r.ratio for r in results)
    worst_1 = max(r.e2e_s / r.decode_s for r in results)
    peaks = [r.e2e_peak for r in results]
    lines.append(
        f"target: end to end within {END_TO_END_TARGET:g}x of decode-only on the same threads: "
        + ("MET" if worst <= END_TO_END_TARGET else "NOT MET")
        + f" (worst {worst:.2f}x; vs one decoding thread {worst_1:.2f}x); "
        + f"peak {_mib(min(peaks))} to {_mib(max(peaks))} MiB"
    )
    return lines


# --------------------------------------------------------------------------- report


def aggregate_report(
    params: int,
    counts: list[int],
    layers: int,
    compression: Compression,
    data: str,
    workdir: Path | None,
    repeat: int,
    force_naive: bool,
) -> Iterator[str]:
    """``bk-sim bench aggregate``'s report, line by line: the aggregation step and end to
    end FedAvg, against the naive form and the decode floor."""
    yield (
        f"bk-sim bench aggregate: {params:,} float32 params in {layers} layers, "
        f"uploads {','.join(map(str, counts))}, compression {compression}, data {data}, "
        f"best of {repeat}"
    )
    yield (_machine())
    pool = _pool(params, layers, data, min(_POOL, max(counts)))
    step = []
    for n in counts:
        step.append(measure_step(pool, n, repeat=repeat, force_naive=force_naive))
    yield ("")
    yield (
        "1. Aggregation step on decoded arrays, FedAvg. cold: freed memory handed back to "
        "the OS before each run (fresh pages, like a first round); warm: the allocator reuses "
        "the last run's memory. GB/s: warm. Peak: tracemalloc of what the step allocates; "
        "held: the inputs it needs in memory at once (one upload streamed / all N); "
        "max|diff|: ours vs naive (naive sums in float32)."
    )
    for line in render_step(step):
        yield (line)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bk-bench-aggregate-", dir=workdir))
    try:
        probe = len(encode_weights(1.0, pool[0], compression=compression))
        free = shutil.disk_usage(folder).free
        if probe * max(counts) > 0.9 * free:
            raise PlatformError(
                f"{folder}: {max(counts)} uploads need ~{probe * max(counts) / 1e9:.1f} GB, "
                f"{free / 1e9:.1f} GB free; pass --workdir on a larger disk or fewer --uploads"
            )
        uploads = _write_uploads(folder, pool, max(counts), compression)
        out = folder / "aggregate.npz"
        e2e = [measure_end_to_end(uploads[:n], out, compression, repeat=repeat) for n in counts]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    yield ("")
    yield (
        "2. End to end, stored uploads -> stored aggregate (aggregate + save_layers, FedAvg; "
        f"aggregate decodes on {_aggregate.READ_THREADS + 1} threads), files in the page "
        "cache. decode: only read the same files, read_weights_fast on 1 thread and on as "
        "many as aggregate (the floors), "
        "read_weights (zlib) once; MB/s of upload files; peak: tracemalloc of the e2e call."
    )
    for line in render_end_to_end(e2e):
        yield (line)
