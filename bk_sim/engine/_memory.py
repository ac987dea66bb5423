"""Each process's memory over a run: RSS sampled with psutil (issue 17).

``MemorySampler`` runs a thread in the orchestrator that samples, every ``interval_s``,
the orchestrator itself, every child process (the platform, the leaf processes; named by
a ``labels`` callback) and the RabbitMQ broker's processes when it runs on this machine.
``section`` turns the samples into results.json's ``memory`` section: per process its
at-rest RSS, its peak, and the peak's growth over rest in units of S (the decoded size of
one upload). ``memory_check`` holds a run to the bound of issue 17: growth <= 3 x S for
the orchestrator and the platform, k x 3 x S for a process hosting k leaves.

Why growth over rest, not the raw peak: a Python process with numpy, requests, pika
and aiohttp takes 60-140 MB before it touches a model; the bound is about what models
cost. Both figures are in results.json. A leaf process's at-rest RSS is what its first
leaf reports once its client is connected (``leaf_started`` carries ``rss``); other
processes use their first sample.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = ["MEMORY_CHECK_MIN_BYTES", "MemorySampler", "memory_check", "process_rss"]

#: Models smaller than this are not held to the bound (process noise dominates).
MEMORY_CHECK_MIN_BYTES = 16 * 2**20
#: At most this many points per process are kept in results.json.
_MAX_POINTS = 1500
_BROKER_NAMES = ("beam.smp",)

#: (display name, kind, leaves hosted) of a pid.
Labels = Callable[[], Mapping[int, tuple[str, str, int]]]


def process_rss() -> int:
    """This process's resident set size in bytes."""
    return int(psutil.Process().memory_info().rss)


@dataclass
class _Series:
    pid: int
    name: str
    kind: str
    leaves: int = 0
    points: list[tuple[float, int]] = field(default_factory=list)


class MemorySampler:
    """Samples RSS of the run's processes in a background thread until ``stop``."""

    def __init__(self, labels: Labels | None = None, *, interval_s: float = 0.5) -> None:
        self._labels = labels
        self._interval = interval_s
        self._series: dict[int, _Series] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = psutil.Process()
        self._broker: list[psutil.Process] = []
        self.t0 = time.time()

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.t0 = time.time()
        for p in psutil.process_iter(["name"]):
            if p.info.get("name") in _BROKER_NAMES:
                self._broker.append(p)
        self._thread = threading.Thread(target=self._loop, name="bk-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.sample()  # one last point: the validator's peak is often at the very end

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        now = time.time() - self.t0
        labels: Mapping[int, tuple[str, str, int]] = {}
        if self._labels is not None:
            with contextlib.suppress(Exception):
                labels = self._labels()
        procs: list[tuple[psutil.Process, str, str, int]] = [
            (self._me, "orchestrator (bk-sim, validator)", "orchestrator", 0)
        ]
        with contextlib.suppress(psutil.Error):
            for child in self._me.children(recursive=True):
                name, kind, leaves = labels.get(child.pid) or self._guess(child)
                procs.append((child, name, kind, leaves))
        for b in self._broker:
            procs.append((b, f"broker (RabbitMQ pid {b.pid}, shared)", "broker", 0))
        for proc, name, kind, leaves in procs:
            try:
                rss = int(proc.memory_info().rss)
            except psutil.Error:
                continue
            series = self._series.get(proc.pid)
            if series is None:
                series = self._series[proc.pid] = _Series(proc.pid, name, kind, leaves)
            elif kind != "other" and series.kind == "other":
                series.name, series.kind, series.leaves = name, kind, leaves
            series.points.append((now, rss))

    @staticmethod
    def _guess(proc: psutil.Process) -> tuple[str, str, int]:
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            cmd = ""
        if "platform" in cmd and "serve" in cmd:
            return "platform", "platform", 0
        return f"process {proc.pid}", "other", 0

    def section(self, model_bytes: int, at_rest: Mapping[int, int] | None = None) -> dict[str, Any]:
        """results.json's ``memory``: per process its at-rest RSS, peak and timeline."""
        s = max(1, int(model_bytes))
        rows = []
        for series in self._series.values():
            if not series.points or series.kind == "other" and len(series.points) < 2:
                continue
            peak = max(r for _, r in series.points)
            rest = (at_rest or {}).get(series.pid, series.points[0][1])
            growth = max(0, peak - rest)
            bounded = series.kind in ("orchestrator", "platform", "leaves")
            limit = 3 * max(1, series.leaves) if bounded else None
            rows.append(
                {
                    "name": series.name,
                    "kind": series.kind,
                    "pid": series.pid,
                    "leaves": series.leaves,
                    "at_rest_bytes": rest,
                    "peak_bytes": peak,
                    "growth_bytes": growth,
                    "peak_x_S": round(peak / s, 3),
                    "growth_x_S": round(growth / s, 3),
                    "limit_x_S": limit,
                    "within_limit": None if limit is None else growth <= limit * s,
                    "timeline": _thin(series.points),
                }
            )
        order = {"orchestrator": 0, "platform": 1, "leaves": 2, "broker": 3, "other": 4}
        rows.sort(key=lambda r: (order.get(str(r["kind"]), 9), str(r["name"])))
        return {
            "S_bytes": s,
            "interval_s": self._interval,
            "rule": "growth over the process's at-rest RSS <= 3 x S "
            "(k x 3 x S for a leaf process hosting k leaves); the broker is not bounded",
            "checked": s >= MEMORY_CHECK_MIN_BYTES,
            "processes": rows,
        }


def _thin(points: Sequence[tuple[float, int]]) -> list[list[float]]:
    """[[seconds, MiB], ...], at most ``_MAX_POINTS`` (every k-th, the peak kept)."""
    step = max(1, -(-len(points) // _MAX_POINTS))
    peak_at = max(range(len(points)), key=lambda i: points[i][1])
    keep = [i for i in range(len(points)) if i % step == 0 or i == peak_at]
    return [[round(points[i][0], 2), round(points[i][1] / 2**20, 1)] for i in keep]


def memory_check(section: Mapping[str, Any]) -> tuple[bool, str] | None:
    """(passed, detail) of the bound, or None when the model is too small to hold to it."""
    if not section.get("checked"):
        return None
    s = int(section["S_bytes"])
    over = [p for p in section["processes"] if p.get("within_limit") is False]
    worst = max(
        (p for p in section["processes"] if p.get("limit_x_S")),
        key=lambda p: float(p["growth_x_S"]) / float(p["limit_x_S"]),
        default=None,
    )
    if over:
        detail = "; ".join(
            f"{p['name']}: +{p['growth_bytes'] / 2**20:.0f} MiB = {p['growth_x_S']} x S "
            f"(limit {p['limit_x_S']} x S, S = {s / 2**20:.0f} MiB)"
            for p in over
        )
        return False, detail
    if worst is None:
        return True, "no process sampled"
    return True, (
        f"largest: {worst['name']} +{worst['growth_bytes'] / 2**20:.0f} MiB = "
        f"{worst['growth_x_S']} x S of {worst['limit_x_S']} x S (S = {s / 2**20:.0f} MiB)"
    )
